"""Rotary position embedding applied from precomputed (cos, sin), as every transformers decoder does.

The teacher's rotary module (1-D RoPE, or Qwen's 3-D M-RoPE with its ``mrope_section`` recomposition) produces
``cos, sin`` of shape (B, L, head_dim); applying them is the same half-rotation for every family, so Local-Swin
reuses the teacher's positions unchanged.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, L, H, D) by ``cos, sin`` (B, L, D) broadcast over heads; returns x's dtype."""
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin
