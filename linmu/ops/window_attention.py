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
  (:func:`build_window_partition`), text queries use a blocked sliding window. No L x L tensor is ever built
  when ``text_window < L``.

:func:`window_decode_attention` is the one-token decode step of a text query against a ring buffer of keys.

Nothing here imports transformers or defines an ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "IMPLS",
    "WindowPartition",
    "build_window_partition",
    "window_attention_mask",
    "local_window_attention",
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


def _check_window_id(window_id: torch.Tensor) -> None:
    if not isinstance(window_id, torch.Tensor):
        raise TypeError(f"window_id must be a torch.Tensor, got {type(window_id).__name__}")
    if window_id.dim() != 2:
        raise ValueError(f"window_id must have shape (B, L), got {tuple(window_id.shape)}")
    if window_id.dtype.is_floating_point or window_id.dtype.is_complex or window_id.dtype == torch.bool:
        raise TypeError(f"window_id must be an integer tensor, got {window_id.dtype}")


def build_window_partition(window_id: torch.Tensor) -> WindowPartition:
    """Group the visual tokens of ``window_id`` by window.

    Args:
        window_id: (B, L) integer tensor; ``-1`` = text token, ``>= 0`` = id of the token's visual window (unique
            within a row; tokens of one window may be scattered over the sequence).

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
    num_visual = int(vis_token.numel())
    num_text = B * L - num_visual
    long_kw = dict(dtype=torch.long, device=device)
    if num_visual == 0:
        empty2 = torch.empty(0, 0, **long_kw)
        empty1 = torch.empty(0, **long_kw)
        return WindowPartition(
            index=empty2, batch=empty1, window_ids=empty1, counts=empty1,
            slot_valid=torch.empty(0, 0, dtype=torch.bool, device=device), flat_index=empty2,
            vis_slot=empty1, vis_token=vis_token, is_visual=is_visual,
            batch_size=B, seq_len=L, max_window=0, num_windows=0, num_visual=0, num_text=num_text,
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
    return WindowPartition(
        index=index, batch=batch, window_ids=window_ids, counts=counts, slot_valid=slot_valid,
        flat_index=flat_index, vis_slot=vis_slot, vis_token=vis_token[order], is_visual=is_visual,
        batch_size=B, seq_len=L, max_window=max_window, num_windows=num_windows, num_visual=num_visual,
        num_text=num_text,
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


def _visual_part(q, k, v, window_id, part: WindowPartition, n_sink, key_valid, scale):
    """Attention of every visual token inside its window (+ sinks). Returns (nV, Hq, D) in the order of
    ``part.vis_token``."""
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    nW, Wm = part.num_windows, part.max_window
    flat = part.flat_index.reshape(-1)
    # Gather window slots: (nW, Wm, H, D); padding slots read a real token and are masked out below.
    qw = q.reshape(B * L, Hq, D).index_select(0, flat).reshape(nW, Wm, Hkv, G, D)
    kw = k.reshape(B * L, Hkv, D).index_select(0, flat).reshape(nW, Wm, Hkv, D)
    vw = v.reshape(B * L, Hkv, D).index_select(0, flat).reshape(nW, Wm, Hkv, D)

    # Keys of the window: real slots whose token is not padding. Same for every query of the window.
    kmask = part.slot_valid
    if key_valid is not None:
        kmask = kmask & key_valid.reshape(-1)[flat].reshape(nW, Wm)
    mask = kmask[:, None, :].expand(nW, Wm, Wm)

    ns = min(n_sink, L)
    if ns > 0:
        # Sinks: the first ns tokens of the window's row, appended as extra keys.
        sflat = (part.batch[:, None] * L + torch.arange(ns, device=q.device)[None]).reshape(-1)  # (nW*ns,)
        ks = k.reshape(B * L, Hkv, D).index_select(0, sflat).reshape(nW, ns, Hkv, D)
        vs = v.reshape(B * L, Hkv, D).index_select(0, sflat).reshape(nW, ns, Hkv, D)
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
    out = _sdpa_grouped(qg, kw.transpose(1, 2), vw.transpose(1, 2), mask, scale)
    out = out.permute(0, 3, 1, 2, 4).reshape(nW * Wm, Hq, D)
    return out.index_select(0, part.vis_slot)


def _text_part(q, k, v, text_window, n_sink, key_valid, scale):
    """Blocked causal sliding window for all queries. Returns (B, L, Hq, D).

    Block size w = min(text_window, L): a query of block b at position i only needs keys in
    (i - text_window, i], which lie in blocks b-1 and b. Each block attends to those 2w keys plus the sinks.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    dev = q.device
    w = min(text_window, L)
    nb = -(-L // w)
    Lp = nb * w
    # With a single block there is no previous block: skip the w all-padding keys.
    prev = 1 if nb > 1 else 0
    kvalid = key_valid if key_valid is not None else torch.ones(B, L, dtype=torch.bool, device=dev)

    qb = F.pad(q, (0, 0, 0, 0, 0, Lp - L)).reshape(B * nb, w, Hkv, G, D)
    # Front pad by one block (the "previous block" of block 0), back pad to Lp.
    kp = F.pad(k, (0, 0, 0, 0, prev * w, Lp - L))
    vp = F.pad(v, (0, 0, 0, 0, prev * w, Lp - L))
    kvp = F.pad(kvalid, (prev * w, Lp - L), value=False)
    if prev:
        kb = torch.cat([kp[:, :Lp].reshape(B, nb, w, Hkv, D), kp[:, w:].reshape(B, nb, w, Hkv, D)], dim=2)
        vb = torch.cat([vp[:, :Lp].reshape(B, nb, w, Hkv, D), vp[:, w:].reshape(B, nb, w, Hkv, D)], dim=2)
        kvb = torch.cat([kvp[:, :Lp].reshape(B, nb, w), kvp[:, w:].reshape(B, nb, w)], dim=2)
    else:
        kb, vb, kvb = kp.reshape(B, nb, w, Hkv, D), vp.reshape(B, nb, w, Hkv, D), kvp.reshape(B, nb, w)
    nk = (1 + prev) * w

    blk = torch.arange(nb, device=dev)
    qpos = (blk * w)[:, None] + torch.arange(w, device=dev)[None]  # (nb, w)
    kpos = (blk * w - prev * w)[:, None] + torch.arange(nk, device=dev)[None]  # (nb, nk)
    qi, kj = qpos[:, :, None], kpos[:, None, :]
    # Local keys: rule (b), plus rule (c) for sinks that fall in the block range (counted here, once).
    local = (kj <= qi) & ((kj > qi - text_window) | (kj < n_sink))  # (nb, w, nk)
    mask = local[None] & kvb[:, :, None, :]  # (B, nb, w, nk)

    ns = min(n_sink, L)
    if ns > 0:
        spos = torch.arange(ns, device=dev)
        ks = k[:, :ns][:, None].expand(B, nb, ns, Hkv, D)
        vs = v[:, :ns][:, None].expand(B, nb, ns, Hkv, D)
        kb = torch.cat([kb, ks], dim=2)
        vb = torch.cat([vb, vs], dim=2)
        # Sink columns only for sinks before the block range (those inside it are local columns already);
        # s < start of the range <= i, so causality holds.
        sblk = spos[None, :] < kpos[:, :1]  # (nb, ns)
        smask = sblk[None, :, None, :] & kvalid[:, None, None, :ns]  # (B, nb, 1, ns)
        mask = torch.cat([mask, smask.expand(B, nb, w, ns)], dim=-1)

    nkt = kb.shape[2]
    qg = qb.permute(0, 2, 3, 1, 4)  # (B*nb, Hkv, G, w, D)
    kg = kb.reshape(B * nb, nkt, Hkv, D).transpose(1, 2)
    vg = vb.reshape(B * nb, nkt, Hkv, D).transpose(1, 2)
    out = _sdpa_grouped(qg, kg, vg, mask.reshape(B * nb, w, nkt), scale)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Lp, Hq, D)
    return out[:, :L]


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
        partition: precomputed :func:`build_window_partition` ``(window_id)`` to reuse across layers (sdpa only);
            built here when None. It must come from this ``window_id`` (not checked, to avoid a host sync).

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

    if partition.num_text > 0:
        out = _text_part(q, k, v, text_window, n_sink, key_valid, scale).reshape(B * L, Hq, D)
    else:
        out = q.new_zeros(B * L, Hq, D)
    if partition.num_visual > 0:
        vis = _visual_part(q, k, v, window_id, partition, n_sink, key_valid, scale)
        # Put the visual rows in place of the text-path rows (the torch.where of the two paths, done sparsely).
        out = out.index_copy(0, partition.vis_token, vis.to(out.dtype))
    return out.reshape(B, L, Hq, D)


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
