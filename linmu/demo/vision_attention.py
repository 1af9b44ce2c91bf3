"""Packed attention for the Qwen2-VL vision tower: one SDPA call instead of one per frame.

transformers' Qwen2-VL vision attention loops over the images / temporal patches of a batch (``torch.split`` by
``cu_seqlens``, one SDPA call each) unless a *flash* implementation is requested, in which case it passes the packed
sequence with ``cu_seq_lens_q``. With hundreds of 16-patch frames per batch (the synthetic suite) that loop dominates
a training step. ``packed_vision_attention`` registers an implementation whose name contains "flash" so that the
packed path is taken, and computes it with SDPA: equal-length sequences are batched exactly, otherwise a
block-diagonal mask is used. It is numerically the same computation as the per-sequence loop.

Used while the demo teacher trains and while `linmu demo` distils and evaluates (``vision_attention(model)``, teacher
and student); saved configs keep "sdpa".
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "linmu_packed_flash"  # must contain "flash" (transformers' is_flash_attention_requested)


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """q, k, v (1, H, S, D) packed sequences delimited by ``cu_seq_lens_q`` -> ((1, S, H, D), None)."""
    if query.shape[0] != 1 or cu_seq_lens_q is None:
        raise ValueError("packed vision attention expects one packed sequence with cu_seq_lens_q")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("packed vision attention needs the same query and key segments")
    _, H, S, D = query.shape
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    n = lengths.numel()
    if n and S % n == 0 and bool((lengths == S // n).all()):
        seg = S // n
        q, k, v = (t[0].view(H, n, seg, D).transpose(0, 1) for t in (query, key, value))  # (n, H, seg, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=is_causal)
        out = out.transpose(0, 1).reshape(H, S, D)
    else:
        seg_id = torch.repeat_interleave(torch.arange(n, device=query.device), lengths, output_size=S)
        mask = seg_id[:, None] == seg_id[None, :]
        if is_causal:
            mask = mask & torch.ones(S, S, dtype=torch.bool, device=query.device).tril()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)[0]
    return out.transpose(0, 1).unsqueeze(0), None


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)


@contextlib.contextmanager
def vision_attention(model):
    """Run ``model``'s vision tower with packed attention inside the block; restore the previous setting after."""
    _register()
    cfg = model.config.vision_config
    visual_cfgs = {id(cfg): cfg}
    for m in model.modules():  # the tower's modules may hold their own reference to the vision config
        c = getattr(m, "config", None)
        if c is not None and type(c) is type(cfg):
            visual_cfgs[id(c)] = c
    before = {k: c._attn_implementation for k, c in visual_cfgs.items()}
    try:
        for c in visual_cfgs.values():
            c._attn_implementation = NAME
        yield model
    finally:
        for k, c in visual_cfgs.items():
            c._attn_implementation = before[k]
