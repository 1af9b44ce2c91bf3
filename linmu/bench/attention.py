"""The teacher's attention for the benchmark, and the floor: the same model with the attention core skipped.

Both are transformers attention functions (``AttentionInterface``), selected for the language decoder only; the
vision tower keeps its own.

- ``linmu_bench_sdpa`` (the teacher): torch SDPA. Prefill without padding runs causal SDPA with native GQA on the
  flash backend (forced on CUDA: a prefill that flash cannot run raises instead of silently timing another kernel).
  A decode step (one query) folds each key/value head's group of query heads into the query axis, as LinMU's own
  decode attention does, so the static KV cache is read once and never repeated per query head (transformers' stock
  SDPA path repeats it ``num_heads / num_kv_heads`` times whenever a mask is present, i.e. on every static-cache
  decode step). On CUDA the cache is also split along its length into chunks attended in parallel and merged by
  their log-sum-exp (flash-decoding), so a step at batch 1 is not left to ``kv_heads`` thread blocks. Results equal
  stock SDPA's.
- ``linmu_bench_floor``: q/k/v projections, RoPE and o_proj run as in the teacher, but the attention core returns
  each query head's value vector (its key/value head's v at the same position). It is the cost of the decoder with a
  free token mixer: the best any linear replacement of attention could do.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

TEACHER_ATTENTION = "linmu_bench_sdpa"
FLOOR_ATTENTION = "linmu_bench_floor"


def _flash_only(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def decode_splits(bh: int, S: int, device: torch.device) -> int:
    """Chunks to split a cache of ``S`` slots into for ``bh`` (batch x kv-head) rows: enough thread blocks for
    two waves over the GPU's multiprocessors, each chunk at least 256 slots and a multiple of 16; 1 on CPU."""
    if device.type != "cuda":
        return 1
    want = math.ceil(2 * torch.cuda.get_device_properties(device).multi_processor_count / bh)
    for n in range(min(want, S // 256), 1, -1):
        if S % n == 0 and (S // n) % 16 == 0:
            return n
    return 1


def _attend_with_lse(q, k, v, bias, scale):
    """(out, lse): attention of q (N, H, G, D) over k/v (N, H, C, D) with an additive bias (N, H, G, C) or None,
    and the log-sum-exp of each query's scaled scores (N, H, G). The CUDA path is SDPA's memory-efficient kernel."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.softmax(scores, -1), v.float()).to(q.dtype), lse


def split_decode_attention(q, k, v, mask, scale, splits: int):
    """One decode step over a long cache, split into ``splits`` chunks merged by log-sum-exp (flash-decoding).

    q (B, Hkv, G, D): a key/value head's G query heads as G queries; k, v (B, Hkv, S, D); mask None or bool
    broadcastable to (B, 1, 1, S), True = attend. Returns (B, Hkv, G, D), equal to SDPA over the whole cache.
    """
    B, Hkv, G, D = q.shape
    S = k.shape[2]
    n, c = splits, S // splits
    # the chunk index sits inside the head index: (B, Hkv, S, D) -> (B, Hkv * n, c, D) is a view
    qs = q[:, :, None].expand(B, Hkv, n, G, D).reshape(B, Hkv * n, G, D)
    ks, vs = k.reshape(B, Hkv * n, c, D), v.reshape(B, Hkv * n, c, D)
    bias = None
    if mask is not None:
        keep = mask.reshape(B, 1, n, c).expand(B, Hkv, n, c).reshape(B, Hkv * n, 1, c)
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        bias = bias.expand(B, Hkv * n, G, c)
    out, lse = _attend_with_lse(qs, ks, vs, bias, scale)
    out = out.view(B, Hkv, n, G, D).float()
    lse = lse.reshape(B, Hkv, n, G).float()
    # softmax over the chunks' log-sum-exps; a chunk with no key to attend (lse = -inf) weighs 0
    w = torch.exp(lse - lse.amax(2, keepdim=True))
    out = torch.where(w[..., None] > 0, out, 0.0)
    return ((w[..., None] * out).sum(2) / w.sum(2)[..., None]).to(q.dtype)


def bench_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (B, H, Lq, D), key/value (B, Hkv, Lk, D), mask None or bool (B, 1, Lq, Lk) -> ((B, Lq, H, D), None)."""
    B, H, Lq, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    if Lq == 1:
        # query head h = kv * G + g (transformers' repeat_kv order): (B, Hkv, G, D) against (B, Hkv, Lk, D)
        q = query.reshape(B, Hkv, G, D)
        scale = scaling if scaling is not None else D**-0.5
        n = decode_splits(B * Hkv, key.shape[2], query.device)
        if n > 1:
            out = split_decode_attention(q, key, value, attention_mask, scale, n)
        else:
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scale)
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
