"""Layers: the Flex-MA and Local-Swin branches and the fused M-MATE block."""

from .flexma import FlexMA, FlexMAState
from .localswin import LocalSwin, SwinState
from .mmate import MMate, MMateState

__all__ = ["FlexMA", "FlexMAState", "LocalSwin", "SwinState", "MMate", "MMateState"]
