"""The teacher's attention for the benchmark, and the floor: the same model with the attention core skipped.

Both are transformers attention functions (``AttentionInterface``), selected for the language decoder only; the
vision tower keeps its own.

- ``linmu_bench_sdpa`` (the teacher): torch SDPA. Prefill without padding runs causal SDPA with native GQA on the
  flash backend (forced on CUDA: a prefill that flash cannot run raises instead of silently timing another kernel).
  A decode step (one query) folds each key/value head's group of query heads into the query axis, as LinMU's own
  decode attention does, so the static KV cache is read once and never repeated per query head (transformers' stock
  SDPA path repeats it ``num_heads / num_kv_heads`` times whenever a mask is present, i.e. on every static-cache
  decode step). Results equal stock SDPA's.
- ``linmu_bench_floor``: q/k/v projections, RoPE and o_proj run as in the teacher, but the attention core returns
  each query head's value vector (its key/value head's v at the same position). It is the cost of the decoder with a
  free token mixer: the best any linear replacement of attention could do.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

TEACHER_ATTENTION = "linmu_bench_sdpa"
FLOOR_ATTENTION = "linmu_bench_floor"


def _flash_only(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def bench_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (B, H, Lq, D), key/value (B, Hkv, Lk, D), mask None or bool (B, 1, Lq, Lk) -> ((B, Lq, H, D), None)."""
    B, H, Lq, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    if Lq == 1:
        # query head h = kv * G + g (transformers' repeat_kv order): (B, Hkv, G, D) against (B, Hkv, Lk, D)
        out = F.scaled_dot_product_attention(query.reshape(B, Hkv, G, D), key, value, attn_mask=attention_mask,
                                             scale=scaling)
        out = out.reshape(B, H, 1, D)
    elif attention_mask is None:
        with _flash_only(query.device):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=G > 1)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=G > 1)
    return out.transpose(1, 2).contiguous(), None


def floor_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention core skipped: every query head gets its key/value head's v at its own position.

    value (B, Hkv, L, D) -> ((B, L, H, D), None) with H = query heads; query and key are not read.
    """
    B, Hkv, L, D = value.shape
    G = query.shape[1] // Hkv
    out = value.transpose(1, 2)  # (B, L, Hkv, D)
    if G > 1:
        out = out[:, :, :, None].expand(B, L, Hkv, G, D).reshape(B, L, Hkv * G, D)
    return out.contiguous(), None


def register() -> None:
    """Make both names known to transformers (idempotent). The teacher gets SDPA's mask builder; the floor none."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TEACHER_ATTENTION, bench_sdpa_attention)
    AttentionMaskInterface.register(TEACHER_ATTENTION, sdpa_mask)
    AttentionInterface.register(FLOOR_ATTENTION, floor_attention)


def set_text_attention(model, name: str) -> None:
    """Switch the language decoder of a transformers VLM to attention ``name`` (the vision tower keeps its own)."""
    register()
    model.set_attn_implementation({"text_config": name})
    got = model.config.get_text_config(decoder=True)._attn_implementation
    if got != name:
        raise RuntimeError(f"could not switch the text attention to {name!r} (it is {got!r})")
