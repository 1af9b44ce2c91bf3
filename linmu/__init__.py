"""linmu: convert a pre-trained vision-language model into a linear-complexity LinMU model."""

from .config import MMateConfig
from .convert import convert, supported_families
from .io import load, load_teacher
from .layout import TokenLayout, VisualSpan

__all__ = ["MMateConfig", "TokenLayout", "VisualSpan", "convert", "load", "load_teacher", "supported_families"]
__version__ = "0.1.0"
