"""Local-Swin window attention as pure tensor functions (LINMU.md §3.2).

Every attention layer of a converted model keeps a local attention branch:

* visual tokens attend bidirectionally inside their own (clipped, possibly shifted) 3-D window,
* text tokens attend causally to the previous ``text_window`` tokens of any modality,
* optionally every query also sees the first ``n_sink`` tokens (attention sinks).

The caller encodes the layout in ``window_id`` (B, L) int64: ``-1`` marks a text query, a value ``>= 0`` is the id
of the visual window the token belongs to (unique within a batch row). Tokens of one window need not be contiguous
in the sequence: a 3-D window of a row-major (t, h, w) grid is scattered over the sequence.

Mask rule: key ``j`` is visible to query ``i`` iff ``key_valid[j]`` and one of

(a) ``window_id[i] >= 0 and window_id[j] == window_id[i]``     (visual query, bidirectional in its window)
(b) ``window_id[i] == -1 and i - text_window < j <= i``          (text query, causal sliding window)
(c) ``j < n_sink and j <= i``                                    (attention sinks)

Implementations:

* ``"reference"``: dense (B, L, L) mask + explicit masked softmax in float32 (or float64 for float64 inputs).
  O(L^2); for tests only.
* ``"sdpa"`` (the default, ``"auto"``): O(L x window) time and memory, forward and backward, CPU and GPU, built on
  ``torch.nn.functional.scaled_dot_product_attention``. Visual tokens are gathered window by window
  (:func:`build_window_partition`) and windows of equal size are batched into one *unmasked* SDPA call each (so
  the flash kernel runs on GPU; GQA through ``enable_gqa``, no repeated keys). Text queries use a blocked causal
  sliding window, computed only for the blocks that hold a text query. No L x L tensor is ever built when
  ``text_window < L``. With sinks, or when a visual token is a padding key, the visual windows take a masked
  SDPA path instead (same result, slower). :func:`window_attention_sorted` is the same computation for q/k/v whose
  rows are already in the partition's window order (the fused M-MATE prefill writes them so).

:func:`window_decode_attention` is the one-token decode step of a text query against a ring buffer of keys.

Nothing here imports transformers or defines an ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "IMPLS",
    "WindowPartition",
    "build_window_partition",
    "window_attention_mask",
    "local_window_attention",
    "window_attention_sorted",
    "window_decode_attention",
]

#: Valid values of ``impl`` for :func:`local_window_attention`.
IMPLS = ("auto", "sdpa", "reference")


# ----------------------------------------------------------------------------------------------------------------
# Partition of the visual tokens into windows
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPartition:
    """Grouping of the visual tokens of a (B, L) ``window_id`` into windows; see :func:`build_window_partition`.

    It depends on ``window_id`` only (not on ``key_valid`` nor on q/k/v), so a model computes it once per forward
    and passes it to every layer that uses the same windows (e.g. one for even and one for shifted odd layers).

    Fields (nW = number of windows over the whole batch, Wmax = largest window, nV = number of visual tokens):

    * ``index``: (nW, Wmax) long, sequence position of each window slot, ``-1`` for a padding slot. Within a window
      positions are increasing.
    * ``batch``: (nW,) long, batch row of each window.
    * ``window_ids``: (nW,) long, the original ``window_id`` value of each window.
    * ``counts``: (nW,) long, number of tokens of each window (``index >= 0`` per row).
    * ``slot_valid``: (nW, Wmax) bool, ``index >= 0``.
    * ``flat_index``: (nW, Wmax) long, ``batch * L + index`` into the flattened (B * L) token axis; padding slots
      point at ``batch * L`` (a real token) and must be masked.
    * ``vis_slot``: (nV,) long, for each visual token the flat slot ``w * Wmax + s`` that holds it.
    * ``vis_token``: (nV,) long, for each visual token its flat token index ``b * L + pos`` (same order).
    * ``is_visual``: (B, L) bool, ``window_id >= 0``.
    * ``batch_size``, ``seq_len``, ``max_window`` (= Wmax), ``num_windows`` (= nW), ``num_visual`` (= nV),
      ``num_text`` (number of tokens with ``window_id == -1``): Python ints.
    * ``order``: (nV,) long, flat token indices of the visual tokens with the windows grouped by size: group
      ``(c, n, off)`` of ``groups`` holds ``n`` windows of ``c`` tokens each at ``order[off : off + n * c]``,
      window after window, positions increasing inside a window.
    * ``groups``: tuple of ``(size, num_windows, offset)`` Python ints, one per distinct window size.
    * ``token_order``: (B * L,) long, ``order`` followed by the text tokens' flat indices (increasing): the row
      order of the window-sorted tensors that :func:`window_attention_sorted` takes.
    * ``token_row``: (B * L,) long, inverse of ``token_order`` (row of each flat token in that order).
    * ``visual_keys_valid``: True / False when built with ``key_valid`` (whether every visual token is a valid
      key, the condition of the unmasked window path), None when built without.
    """

    index: torch.Tensor
    batch: torch.Tensor
    window_ids: torch.Tensor
    counts: torch.Tensor
    slot_valid: torch.Tensor
    flat_index: torch.Tensor
    vis_slot: torch.Tensor
    vis_token: torch.Tensor
    is_visual: torch.Tensor
    batch_size: int
    seq_len: int
    max_window: int
    num_windows: int
    num_visual: int
    num_text: int
    order: torch.Tensor
    groups: tuple[tuple[int, int, int], ...]
    token_order: torch.Tensor
    token_row: torch.Tensor
    visual_keys_valid: bool | None = None
    # host-side results derived once per partition (e.g. the text blocks of a text window); not part of equality
    _cache: dict = field(default_factory=dict, compare=False, repr=False)


def _check_window_id(window_id: torch.Tensor) -> None:
    if not isinstance(window_id, torch.Tensor):
        raise TypeError(f"window_id must be a torch.Tensor, got {type(window_id).__name__}")
    if window_id.dim() != 2:
        raise ValueError(f"window_id must have shape (B, L), got {tuple(window_id.shape)}")
    if window_id.dtype.is_floating_point or window_id.dtype.is_complex or window_id.dtype == torch.bool:
        raise TypeError(f"window_id must be an integer tensor, got {window_id.dtype}")


def build_window_partition(window_id: torch.Tensor, key_valid: torch.Tensor | None = None) -> WindowPartition:
    """Group the visual tokens of ``window_id`` by window.

    Args:
        window_id: (B, L) integer tensor; ``-1`` = text token, ``>= 0`` = id of the token's visual window (unique
            within a row; tokens of one window may be scattered over the sequence).
        key_valid: optional (B, L) bool padding mask, only read to record ``visual_keys_valid`` (so that
            attention calls given this partition need no host sync to choose the unmasked window path).

    Returns:
        A :class:`WindowPartition`. Building it syncs with the host (unique / counts / max); reuse it across the
        layers that share the layout.

    Example::

        >>> wid = torch.tensor([[-1, 0, 1, 0, 1, -1]])
        >>> p = build_window_partition(wid)
        >>> p.index
        tensor([[1, 3],
                [2, 4]])
    """
    _check_window_id(window_id)
    B, L = window_id.shape
    device = window_id.device
    wid = window_id.long()
    if B * L > 0 and bool((wid < -1).any()):
        raise ValueError("window_id must be -1 (text) or >= 0 (visual window id)")
    is_visual = wid >= 0

    # Flat token indices (b * L + pos) of the visual tokens, in (b, pos) order.
    vis_token = is_visual.reshape(-1).nonzero().squeeze(1)
    text_token = (~is_visual).reshape(-1).nonzero().squeeze(1)
    num_visual = int(vis_token.numel())
    num_text = B * L - num_visual
    long_kw = dict(dtype=torch.long, device=device)
    visual_keys_valid = None
    if key_valid is not None:
        if key_valid.shape != window_id.shape:
            raise ValueError(f"key_valid shape {tuple(key_valid.shape)} != window_id shape {tuple(window_id.shape)}")
        visual_keys_valid = bool((key_valid.to(device).bool() | ~is_visual).all())
    if num_visual == 0:
        empty2 = torch.empty(0, 0, **long_kw)
        empty1 = torch.empty(0, **long_kw)
        return WindowPartition(
            index=empty2, batch=empty1, window_ids=empty1, counts=empty1,
            slot_valid=torch.empty(0, 0, dtype=torch.bool, device=device), flat_index=empty2,
            vis_slot=empty1, vis_token=vis_token, is_visual=is_visual,
            batch_size=B, seq_len=L, max_window=0, num_windows=0, num_visual=0, num_text=num_text,
            order=empty1, groups=(), token_order=text_token, token_row=text_token.clone(),
            visual_keys_valid=visual_keys_valid,
        )

    vb = vis_token // L
    vpos = vis_token % L
    vid = wid.reshape(-1)[vis_token]
    # One key per (row, window id); unique() sorts the keys, so windows come out grouped by row then by id.
    key = vb * (int(vid.max()) + 1) + vid
    uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    num_windows = int(uniq.numel())
    max_window = int(counts.max())
    # A stable sort by window keeps the (b, pos) order inside each window, so slots hold increasing positions.
    order = torch.sort(inverse, stable=True).indices
    win_of = inverse[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(num_visual, **long_kw) - starts[win_of]

    index = torch.full((num_windows, max_window), -1, **long_kw)
    index[win_of, slot] = vpos[order]
    batch = torch.empty(num_windows, **long_kw)
    batch[win_of] = vb[order]
    window_ids = torch.empty(num_windows, **long_kw)
    window_ids[win_of] = vid[order]
    slot_valid = index >= 0
    flat_index = batch[:, None] * L + index.clamp(min=0)
    vis_slot = win_of * max_window + slot

    # Windows grouped by size (stable: by row, then id inside a size), for one unmasked SDPA call per size.
    by_size = torch.sort(counts, stable=True).indices
    sorted_order = flat_index[by_size][slot_valid[by_size]]  # (nV,) window after window
    sizes = counts[by_size].tolist()
    groups, off, i = [], 0, 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        groups.append((sizes[i], j - i, off))
        off += sizes[i] * (j - i)
        i = j
    token_order = torch.cat([sorted_order, text_token])
    token_row = torch.empty_like(token_order)
    token_row[token_order] = torch.arange(B * L, **long_kw)
    return WindowPartition(
        index=index, batch=batch, window_ids=window_ids, counts=counts, slot_valid=slot_valid,
        flat_index=flat_index, vis_slot=vis_slot, vis_token=vis_token[order], is_visual=is_visual,
        batch_size=B, seq_len=L, max_window=max_window, num_windows=num_windows, num_visual=num_visual,
        num_text=num_text, order=sorted_order, groups=tuple(groups), token_order=token_order,
        token_row=token_row, visual_keys_valid=visual_keys_valid,
    )


# ----------------------------------------------------------------------------------------------------------------
# Dense mask + reference
# ----------------------------------------------------------------------------------------------------------------


def _check_mask_args(window_id, text_window, n_sink, key_valid) -> None:
    _check_window_id(window_id)
    if isinstance(text_window, bool) or not isinstance(text_window, int) or text_window < 1:
        raise ValueError(f"text_window must be an int >= 1, got {text_window!r}")
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an int >= 0, got {n_sink!r}")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
            raise TypeError("key_valid must be a bool tensor of shape (B, L) or None")
        if key_valid.shape != window_id.shape:
            raise ValueError(
                f"key_valid shape {tuple(key_valid.shape)} != window_id shape {tuple(window_id.shape)}"
            )


def window_attention_mask(
    window_id: torch.Tensor,
    *,
    text_window: int,
    n_sink: int = 0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense boolean mask of the Local-Swin rule; ``mask[b, i, j]`` = key ``j`` visible to query ``i``.

    Args:
        window_id: (B, L) int, ``-1`` text, ``>= 0`` visual window id.
        text_window: >= 1, text query ``i`` sees keys ``i - text_window < j <= i``.
        n_sink: first ``n_sink`` positions are sinks, visible to every query at or after them.
        key_valid: (B, L) bool or None; ``False`` keys (padding) are never visible.

    Returns:
        (B, L, L) bool. O(L^2) memory: for tests and the reference path only.

    Example::

        >>> m = window_attention_mask(torch.tensor([[-1, 0, 0, -1]]), text_window=2)
        >>> m[0].int()
        tensor([[1, 0, 0, 0],
                [0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    _check_mask_args(window_id, text_window, n_sink, key_valid)
    B, L = window_id.shape
    wid = window_id.long()
    pos = torch.arange(L, device=window_id.device)
    qi = pos[:, None]
    kj = pos[None, :]
    causal = kj <= qi  # (L, L)
    is_vis = (wid >= 0)[:, :, None]  # (B, L, 1) query is visual
    same_win = wid[:, :, None] == wid[:, None, :]  # (B, L, L)
    rule_a = is_vis & same_win
    rule_b = ~is_vis & (causal & (kj > qi - text_window))[None]
    rule_c = (causal & (kj < n_sink))[None]
    mask = rule_a | rule_b | rule_c
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask


def _reference(q, k, v, mask, scale):
    B, L, Hq, D = q.shape
    G = Hq // k.shape[2]
    # Float32 softmax (float64 stays float64, so tests can build an exact reference).
    cdt = torch.promote_types(q.dtype, torch.float32)
    kk = k.to(cdt).repeat_interleave(G, dim=2)
    vv = v.to(cdt).repeat_interleave(G, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(cdt), kk) * scale
    m = mask[:, None]  # (B, 1, L, L)
    scores = scores.masked_fill(~m, float("-inf"))
    # Row max as a detached shift (softmax is shift invariant); rows with no key get shift 0 instead of -inf.
    rmax = scores.amax(dim=-1, keepdim=True).detach()
    rmax = torch.where(torch.isfinite(rmax), rmax, torch.zeros_like(rmax))
    p = torch.exp(scores - rmax) * m
    denom = p.sum(dim=-1, keepdim=True)
    # A row with no visible key has p == 0 everywhere: dividing by 1 keeps it 0 (never NaN).
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SDPA path
# ----------------------------------------------------------------------------------------------------------------


def _sdpa_grouped(qg, kg, vg, mask, scale):
    """SDPA with GQA folded into the query length, and rows without any visible key forced to 0.

    qg: (N, Hkv, G, Lq, D); kg, vg: (N, Hkv, Lk, D); mask: (N, Lq, Lk) bool (same for every head).
    Returns (N, Hkv, G, Lq, D).

    GQA: instead of repeating k/v per query head (G copies) or relying on ``enable_gqa`` (unsupported by the CUDA
    memory-efficient kernel, which is the one that takes a mask), the G query heads sharing a kv head are stacked
    along the query length: SDPA sees Hkv heads and G * Lq queries, and the mask is repeated G times.
    """
    N, Hkv, G, Lq, D = qg.shape
    # A fully masked row is NaN on some backends; give it one visible key (column 0) and zero its output after.
    has_key = mask.any(dim=-1)  # (N, Lq)
    col0 = torch.zeros_like(mask)
    col0[..., 0] = True
    mask = mask | (col0 & ~has_key[..., None])
    m = mask[:, None, None].expand(N, 1, G, Lq, mask.shape[-1]).reshape(N, 1, G * Lq, mask.shape[-1])
    out = F.scaled_dot_product_attention(qg.reshape(N, Hkv, G * Lq, D), kg, vg, attn_mask=m, scale=scale)
    out = out.reshape(N, Hkv, G, Lq, D)
    return out * has_key[:, None, None, :, None].to(out.dtype)


def _rows(t: torch.Tensor, flat: torch.Tensor, remap: torch.Tensor | None) -> torch.Tensor:
    """Rows of the flat token indices ``flat`` from ``t`` (rows in token order, or in ``remap`` order)."""
    return t.index_select(0, flat if remap is None else remap.index_select(0, flat))


def _visual_masked_into(out, q, k, v, remap, window_id, part: WindowPartition, n_sink, key_valid, scale):
    """Visual tokens inside their window (+ sinks) with a per-window key mask; written into ``out`` rows.

    q: (N, Hq, D) rows of every token, k/v: (N, Hkv, D), in flat token order or, with ``remap``, at row
    ``remap[b * L + pos]``. Used with sinks or padding keys inside windows; same result as the grouped path.
    """
    B, L = window_id.shape
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    G = Hq // Hkv
    nW, Wm = part.num_windows, part.max_window
    flat = part.flat_index.reshape(-1)
    # Gather window slots: (nW, Wm, H, D); padding slots read a real token and are masked out below.
    qw = _rows(q, flat, remap).reshape(nW, Wm, Hkv, G, D)
    kw = _rows(k, flat, remap).reshape(nW, Wm, Hkv, D)
    vw = _rows(v, flat, remap).reshape(nW, Wm, Hkv, D)

    # Keys of the window: real slots whose token is not padding. Same for every query of the window.
    kmask = part.slot_valid
    if key_valid is not None:
        kmask = kmask & key_valid.reshape(-1)[flat].reshape(nW, Wm)
    mask = kmask[:, None, :].expand(nW, Wm, Wm)

    ns = min(n_sink, L)
    if ns > 0:
        # Sinks: the first ns tokens of the window's row, appended as extra keys.
        sflat = (part.batch[:, None] * L + torch.arange(ns, device=q.device)[None]).reshape(-1)  # (nW*ns,)
        ks = _rows(k, sflat, remap).reshape(nW, ns, Hkv, D)
        vs = _rows(v, sflat, remap).reshape(nW, ns, Hkv, D)
        kw = torch.cat([kw, ks], dim=1)
        vw = torch.cat([vw, vs], dim=1)
        spos = torch.arange(ns, device=q.device)
        swid = window_id[:, :ns].long()[part.batch]  # (nW, ns) window id of each sink token (-1 text)
        # A sink already inside the window is a window key: counting it again would double its weight.
        smask = (swid != part.window_ids[:, None])[:, None, :] & (spos[None, None, :] <= part.index[:, :, None])
        if key_valid is not None:
            smask = smask & key_valid.reshape(-1)[sflat].reshape(nW, 1, ns)
        mask = torch.cat([mask, smask], dim=-1)

    qg = qw.permute(0, 2, 3, 1, 4)  # (nW, Hkv, G, Wm, D)
    o = _sdpa_grouped(qg, kw.transpose(1, 2), vw.transpose(1, 2), mask, scale)
    o = o.permute(0, 3, 1, 2, 4).reshape(nW * Wm, Hq, D)
    out.index_copy_(0, part.vis_token, o.index_select(0, part.vis_slot).to(out.dtype))


def _visual_grouped_into(out, qv, kv, vv, part: WindowPartition, scale):
    """Visual tokens inside their window, one unmasked SDPA call per window size; written into ``out`` rows.

    qv: (nV, Hq, D), kv/vv: (nV, Hkv, D), the visual tokens in ``part.order``. Exact when no window holds a
    padding key and there are no sinks: every query of a window sees exactly the keys of its window.
    """
    Hq, D = qv.shape[1:]
    Hkv = kv.shape[1]
    for size, n, off in part.groups:
        rows = slice(off, off + n * size)
        qg = qv[rows].view(n, size, Hq, D).transpose(1, 2)
        kg = kv[rows].view(n, size, Hkv, D).transpose(1, 2)
        vg = vv[rows].view(n, size, Hkv, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale, enable_gqa=Hq != Hkv)
        out.index_copy_(0, part.order[rows], o.transpose(1, 2).reshape(n * size, Hq, D).to(out.dtype))


def _text_blocks(part: WindowPartition, w: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Blocks of ``w`` positions that hold at least one text query, memoised on the partition.

    Returns ``(blocks, keep, dest)``: flat block ids ``b * nb + blk`` (S,), the rows of the (S * w) block queries
    that lie inside the sequence (None when all do) and their flat token indices ``b * L + pos``.
    """
    key = ("text_blocks", w)
    if key not in part._cache:
        B, L = part.batch_size, part.seq_len
        dev = part.is_visual.device
        nb = -(-L // w)
        text = F.pad(~part.is_visual, (0, nb * w - L)).reshape(B, nb, w).any(-1)
        blocks = text.reshape(-1).nonzero().squeeze(1)
        qpos = ((blocks % nb)[:, None] * w + torch.arange(w, device=dev)).reshape(-1)
        dest = (blocks // nb).repeat_interleave(w) * L + qpos
        inside = qpos < L
        keep = None
        if not bool(inside.all()):
            keep = inside.nonzero().squeeze(1)
            dest = dest[keep]
        part._cache[key] = (blocks, keep, dest)
    return part._cache[key]


def _text_into(out, q, k, v, remap, part, text_window, n_sink, key_valid, scale):
    """Blocked causal sliding window for the queries of ``blocks``; written into ``out`` rows.

    Block size w = min(text_window, L): a query of block b at position i only needs keys in
    (i - text_window, i], which lie in blocks b-1 and b. Each block attends to those 2w keys plus the sinks.
    Every row of a listed block is written (its visual rows too: the visual path overwrites them after).
    q: (N, Hq, D), k/v: (N, Hkv, D) in flat token order or, with ``remap``, at row ``remap[b * L + pos]``.
    """
    L = part.seq_len
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    w = min(text_window, L)
    nb = -(-L // w)
    blocks, keep, dest = _text_blocks(part, w)
    # With a single block there is no previous block.
    prev = 1 if nb > 1 else 0
    nk = (1 + prev) * w
    S = blocks.numel()
    row = blocks // nb
    blk = blocks % nb
    qpos = blk[:, None] * w + torch.arange(w, device=dev)  # (S, w)
    kpos = (blk[:, None] - prev) * w + torch.arange(nk, device=dev)  # (S, nk)
    k_ok = (kpos >= 0) & (kpos < L)
    qf = row[:, None] * L + qpos.clamp(max=L - 1)
    kf = row[:, None] * L + kpos.clamp(0, L - 1)
    qb = _rows(q, qf.reshape(-1), remap).reshape(S, w, Hkv, G, D)
    kb = _rows(k, kf.reshape(-1), remap).reshape(S, nk, Hkv, D)
    vb = _rows(v, kf.reshape(-1), remap).reshape(S, nk, Hkv, D)
    if key_valid is not None:
        k_ok = k_ok & key_valid.reshape(-1)[kf]
    qi, kj = qpos[:, :, None], kpos[:, None, :]
    # Local keys: rule (b), plus rule (c) for sinks that fall in the block range (counted here, once).
    mask = (kj <= qi) & ((kj > qi - text_window) | (kj < n_sink)) & k_ok[:, None, :]  # (S, w, nk)

    ns = min(n_sink, L)
    if ns > 0:
        sflat = (row[:, None] * L + torch.arange(ns, device=dev)).reshape(-1)
        kb = torch.cat([kb, _rows(k, sflat, remap).reshape(S, ns, Hkv, D)], dim=1)
        vb = torch.cat([vb, _rows(v, sflat, remap).reshape(S, ns, Hkv, D)], dim=1)
        # Sink columns only for sinks before the block range (those inside it are local columns already);
        # s < start of the range <= i, so causality holds.
        smask = torch.arange(ns, device=dev)[None, :] < kpos[:, :1]  # (S, ns)
        if key_valid is not None:
            smask = smask & key_valid.reshape(-1)[sflat].reshape(S, ns)
        mask = torch.cat([mask, smask[:, None, :].expand(S, w, ns)], dim=-1)

    o = _sdpa_grouped(qb.permute(0, 2, 3, 1, 4), kb.transpose(1, 2), vb.transpose(1, 2), mask, scale)
    o = o.permute(0, 3, 1, 2, 4).reshape(S * w, Hq, D)
    if keep is not None:
        o = o.index_select(0, keep)
    out.index_copy_(0, dest, o.to(out.dtype))


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, L, H, D), got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    B, L, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != L or k.shape[3] != D:
        raise ValueError(f"q shape {tuple(q.shape)} and k/v shape {tuple(k.shape)} disagree on B, L or D")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_id: torch.Tensor,
    *,
    text_window: int,
    n_sink: int = 0,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
    partition: WindowPartition | None = None,
) -> torch.Tensor:
    """Local-Swin attention: visual tokens in their window, text tokens in a causal sliding window, + sinks.

    Args:
        q: (B, L, Hq, D), RoPE already applied.
        k, v: (B, L, Hkv, D) with ``Hq % Hkv == 0``; query head ``h`` uses kv head ``h // (Hq // Hkv)``.
        window_id: (B, L) int; ``-1`` = text query, ``>= 0`` = visual window id (unique within a row; tokens of a
            window may be scattered).
        text_window: >= 1; text query ``i`` sees keys ``i - text_window < j <= i`` of any modality.
        n_sink: every query ``i`` also sees keys ``j < n_sink, j <= i``.
        key_valid: (B, L) bool or None; ``False`` = padding, never attended. Padded queries output finite values
            (0 when they see no key).
        scale: softmax scale, default ``D ** -0.5``.
        impl: ``"auto"`` (= ``"sdpa"``), ``"sdpa"`` (O(L x window)) or ``"reference"`` (dense mask, O(L^2)).
        partition: precomputed :func:`build_window_partition` ``(window_id[, key_valid])`` to reuse across layers
            (sdpa only); built here when None. It must come from this ``window_id`` and, if it was built with one,
            this ``key_valid`` (not checked, to avoid a host sync).

    Returns:
        (B, L, Hq, D) in ``q.dtype``. A query with no visible key outputs 0.

    Example::

        >>> B, L, H, D = 1, 6, 2, 8
        >>> q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
        >>> wid = torch.tensor([[-1, 0, 1, 0, 1, -1]])  # two scattered visual windows between text tokens
        >>> out = local_window_attention(q, k, v, wid, text_window=4)
        >>> out.shape
        torch.Size([1, 6, 2, 8])
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    _check_qkv(q, k, v)
    _check_mask_args(window_id, text_window, n_sink, key_valid)
    B, L, Hq, D = q.shape
    if window_id.shape != (B, L):
        raise ValueError(f"window_id shape {tuple(window_id.shape)} != (B, L) = {(B, L)}")
    if window_id.device != q.device:
        raise ValueError(f"window_id is on {window_id.device}, q on {q.device}")
    if key_valid is not None and key_valid.device != q.device:
        raise ValueError(f"key_valid is on {key_valid.device}, q on {q.device}")
    if scale is None:
        scale = D**-0.5

    if impl == "reference":
        mask = window_attention_mask(window_id, text_window=text_window, n_sink=n_sink, key_valid=key_valid)
        return _reference(q, k, v, mask, scale)

    if partition is None:
        partition = build_window_partition(window_id)
    elif not isinstance(partition, WindowPartition):
        raise TypeError(f"partition must be a WindowPartition, got {type(partition).__name__}")
    elif (partition.batch_size, partition.seq_len) != (B, L):
        raise ValueError(
            f"partition was built for (B, L) = {(partition.batch_size, partition.seq_len)}, got {(B, L)}"
        )
    if B * L == 0:
        return q.new_zeros(B, L, Hq, D)
    Hkv = k.shape[2]
    out = q.new_empty(B * L, Hq, D)  # every row is written below: text rows by the text path, visual by windows
    _attention_into(out, q.reshape(B * L, Hq, D), k.reshape(B * L, Hkv, D), v.reshape(B * L, Hkv, D), None,
                    window_id, partition, text_window, n_sink, key_valid, scale)
    return out.view(B, L, Hq, D)


def window_attention_sorted(
    qs: torch.Tensor,
    ks: torch.Tensor,
    vs: torch.Tensor,
    window_id: torch.Tensor,
    partition: WindowPartition,
    *,
    text_window: int,
    n_sink: int = 0,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`local_window_attention` (``impl="sdpa"``) on tokens already in the partition's window order.

    For callers that produce q/k/v directly in that order (the fused M-MATE prefill gathers and rotates them in
    one pass), so the visual windows need no gather.

    Args:
        qs: (B * L, Hq, D), row ``r`` holds token ``partition.token_order[r]`` (flat index ``b * L + pos``).
        ks, vs: (B * L, Hkv, D), same row order.
        window_id, partition: as for :func:`local_window_attention` (the partition is required here).
        text_window, n_sink, key_valid, scale: as for :func:`local_window_attention`.
        out: optional (B * L, Hq, D) tensor (any strides) that receives the result in flat token order.

    Returns:
        ``out`` (or a new (B * L, Hq, D) tensor): row ``b * L + pos`` is the output of token ``pos`` of row ``b``.
    """
    _check_mask_args(window_id, text_window, n_sink, key_valid)
    B, L = window_id.shape
    if (partition.batch_size, partition.seq_len) != (B, L):
        raise ValueError(f"partition was built for (B, L) = {(partition.batch_size, partition.seq_len)}, got {(B, L)}")
    if qs.dim() != 3 or ks.dim() != 3 or ks.shape != vs.shape or qs.shape[0] != B * L or ks.shape[0] != B * L:
        raise ValueError(f"qs must be (B*L, Hq, D) and ks/vs (B*L, Hkv, D); got {tuple(qs.shape)}, {tuple(ks.shape)}")
    D = qs.shape[-1]
    if out is None:
        out = qs.new_empty(qs.shape)
    elif out.shape != qs.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != {tuple(qs.shape)}")
    if B * L == 0:
        return out
    _attention_into(out, qs, ks, vs, partition.token_row, window_id, partition, text_window, n_sink, key_valid,
                    D**-0.5 if scale is None else scale)
    return out


def _attention_into(out, q, k, v, remap, window_id, part, text_window, n_sink, key_valid, scale):
    """Text path for the blocks with text queries, then the visual windows (grouped, or masked with sinks or
    padding keys inside windows). q/k/v rows in flat token order, or in ``part.token_order`` with ``remap``."""
    if part.num_text > 0:
        _text_into(out, q, k, v, remap, part, text_window, n_sink, key_valid, scale)
    if part.num_visual == 0:
        return
    if n_sink == 0 and _visual_keys_valid(part, key_valid):
        if remap is None:
            qv, kv, vv = (t.index_select(0, part.order) for t in (q, k, v))
        else:  # the window order puts the visual tokens first, in part.order
            nV = part.num_visual
            qv, kv, vv = q[:nV], k[:nV], v[:nV]
        _visual_grouped_into(out, qv, kv, vv, part, scale)
    else:
        _visual_masked_into(out, q, k, v, remap, window_id, part, n_sink, key_valid, scale)


def _visual_keys_valid(part: WindowPartition, key_valid: torch.Tensor | None) -> bool:
    if key_valid is None:
        return True
    if part.visual_keys_valid is not None:
        return part.visual_keys_valid
    return bool((key_valid | ~part.is_visual).all())  # one host sync: pass a partition built with key_valid


# ----------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------


def window_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_valid: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One new text token against a ring buffer of keys (sinks + the last ``text_window`` tokens, itself included).

    The slot order of the ring does not matter (softmax is permutation invariant); only ``cache_valid`` does.
    No host sync and static shapes, so it can be captured in a CUDA graph.

    Args:
        q: (B, 1, Hq, D), RoPE applied.
        k_cache, v_cache: (B, S, Hkv, D), S = ring capacity incl. sink slots; ``Hq % Hkv == 0``.
        cache_valid: (B, S) bool, which slots hold a key to attend to.
        scale: default ``D ** -0.5``.

    Returns:
        (B, 1, Hq, D) in ``q.dtype``; 0 for a row with no valid slot.

    Example::

        >>> q = torch.randn(2, 1, 4, 16); kc = torch.randn(2, 8, 2, 16); vc = torch.randn(2, 8, 2, 16)
        >>> valid = torch.ones(2, 8, dtype=torch.bool)
        >>> window_decode_attention(q, kc, vc, valid).shape
        torch.Size([2, 1, 4, 16])
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, *, H, D)")
    if q.shape[1] != 1:
        raise ValueError(f"q must have shape (B, 1, Hq, D), got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} != v_cache shape {tuple(v_cache.shape)}")
    B, _, Hq, D = q.shape
    _, S, Hkv, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D:
        raise ValueError(f"q shape {tuple(q.shape)} and cache shape {tuple(k_cache.shape)} disagree on B or D")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not isinstance(cache_valid, torch.Tensor) or cache_valid.dtype != torch.bool:
        raise TypeError("cache_valid must be a bool tensor of shape (B, S)")
    if cache_valid.shape != (B, S):
        raise ValueError(f"cache_valid shape {tuple(cache_valid.shape)} != (B, S) = {(B, S)}")
    if scale is None:
        scale = D**-0.5
    G = Hq // Hkv
    # GQA folded into the query length: (B, Hkv, G, D) queries against (B, Hkv, S, D) keys, no k/v copies.
    qg = q.reshape(B, Hkv, G, D)
    has_key = cache_valid.any(dim=-1)  # (B,), stays on device
    col0 = torch.zeros_like(cache_valid)
    col0[:, 0] = True
    mask = cache_valid | (col0 & ~has_key[:, None])
    out = F.scaled_dot_product_attention(
        qg, k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale
    )
    out = out * has_key[:, None, None, None].to(out.dtype)
    return out.reshape(B, 1, Hq, D)
