"""Reading the shape of a teacher attention module (any transformers decoder attention with q/k/v/o_proj)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class AttentionDims:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


def attention_dims(attn: nn.Module) -> AttentionDims:
    """Dimensions of a transformers attention module; raises TypeError naming what is missing."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise TypeError(
                f"{type(attn).__name__} has no nn.Linear `{name}`: only attention modules with separate "
                "q_proj/k_proj/v_proj/o_proj projections can be converted"
            )
    cfg = getattr(attn, "config", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None:
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, hidden = attn.q_proj.weight.shape
    kv_out = attn.k_proj.weight.shape[0]
    if q_out % head_dim or kv_out % head_dim:
        raise ValueError(f"projection widths {q_out}/{kv_out} are not multiples of head_dim={head_dim}")
    scaling = getattr(attn, "scaling", None) or head_dim**-0.5
    return AttentionDims(hidden, q_out // head_dim, kv_out // head_dim, head_dim, float(scaling))
