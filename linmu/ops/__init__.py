"""Pure tensor functions: no nn.Module, no transformers import."""

from .rope import apply_rope, rotate_half
from .ssd import ssd_available_impls, ssd_scan, ssd_step
from .window_attention import (
    WindowPartition,
    build_window_partition,
    local_window_attention,
    window_attention_mask,
    window_decode_attention,
)

__all__ = [
    "apply_rope", "rotate_half", "ssd_available_impls", "ssd_scan", "ssd_step", "WindowPartition",
    "build_window_partition", "local_window_attention", "window_attention_mask", "window_decode_attention",
]
