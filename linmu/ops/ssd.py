"""Mamba2 SSD (state-space duality) scan with one scalar decay per head.

Two pure tensor functions, no ``nn.Module`` and no transformers import:

* :func:`ssd_scan` -- the whole sequence at once (training / prefill), causal or reversed,
  batched or packed (``cu_seqlens``). Backends: a chunked pure-PyTorch implementation
  (any device and dtype, autograd) and fla-core's Triton ``chunk_simple_gla`` on CUDA.
* :func:`ssd_step` -- one token of the same recurrence (decoding), CUDA-graph friendly.

The recurrence, per batch row ``b`` and head ``h`` (``S`` is ``(headdim, d_state)``)::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)
    y_t = S_t @ C_t + D * x_t

``dt`` must already be positive (softplus / bias / clamp happen outside), ``A`` negative.

The chunked torch algorithm follows ``ssd_minimal_discrete`` ("Listing 1" of the SSD paper,
``mamba_ssm/modules/ssd_minimal.py`` in state-spaces/mamba, Apache-2.0, Tri Dao and Albert Gu),
with one change: the inter-chunk recurrence is computed in groups of chunks with a sequential
loop over the groups, so its cost is linear in the number of chunks instead of quadratic.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

__all__ = ["ssd_scan", "ssd_step", "ssd_available_impls"]

_VALID_IMPLS = ("auto", "torch", "fla")
_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Chunks per group in the inter-chunk recurrence: a (G+1)x(G+1) decay matrix per group, one
# sequential step per group. Work is O(nchunks * G), the Python loop runs nchunks / G times.
_CHUNK_GROUP = 16


# --------------------------------------------------------------------------------------------
# Backend discovery
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fla_import_error() -> str | None:
    """None if ``fla.ops.simple_gla`` imports, else the reason it does not (cached)."""
    try:
        import fla.ops.simple_gla  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing to find a driver
        return f"{type(exc).__name__}: {exc}"
    return None


def _fla_backward_blocked() -> str | None:
    """Why fla-core refuses chunk_simple_gla's backward here, or None if it runs.

    fla-core 0.6.0 raises in the gated ``chunk_bwd_dqkwg`` on Hopper with 3.4.0 <= Triton <
    3.7.1 (wrong dk/dg from a Triton bug, fla issue #640); read fla's own flags at call time.
    """
    try:
        from fla.ops.common import chunk_o
    except Exception:
        return None
    flags = (getattr(chunk_o, n, None) for n in ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0", "TRITON_ABOVE_3_7_1"))
    hopper, above_3_4, above_3_7_1 = flags
    if hopper and above_3_4 and above_3_7_1 is False:
        return "fla-core's chunk_simple_gla backward is disabled on Hopper GPUs with Triton in [3.4.0, 3.7.1) (fla issue #640)"
    return None


def ssd_available_impls(device: torch.device | str | None = None) -> tuple[str, ...]:
    """Backends :func:`ssd_scan` can run on ``device`` (default: CUDA if present, else CPU).

    >>> "torch" in ssd_available_impls("cpu")
    True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = ["torch"]
    if torch.device(device).type == "cuda" and _fla_import_error() is None:
        impls.append("fla")
    return tuple(impls)


def _resolve_impl(impl: str, x: torch.Tensor, needs_grad: bool) -> str:
    if impl not in _VALID_IMPLS:
        raise ValueError(f"ssd_scan: unknown impl={impl!r}; valid values are {', '.join(map(repr, _VALID_IMPLS))}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        use_fla = x.is_cuda and x.dtype in _FLA_DTYPES and _fla_import_error() is None
        if use_fla and needs_grad:
            # Fall back to torch rather than fail later in backward (explicit impl="fla" does not).
            reason = _fla_backward_blocked()
            if reason is not None:
                _warn_once(f"ssd_scan(impl='auto'): {reason}; using impl='torch' for this differentiable call. "
                           "Upgrade Triton to >= 3.7.1 to use fla for training.")
                use_fla = False
        return "fla" if use_fla else "torch"
    # impl == "fla": say exactly what is missing.
    if not x.is_cuda:
        raise RuntimeError(f"ssd_scan(impl='fla') needs CUDA tensors, got tensors on {x.device}; use impl='torch' or 'auto'")
    err = _fla_import_error()
    if err is not None:
        raise RuntimeError(
            "ssd_scan(impl='fla') needs fla-core installed (pip install linmu[gpu]); "
            f"importing fla.ops.simple_gla failed with {err}"
        )
    if x.dtype not in _FLA_DTYPES:
        raise RuntimeError(f"ssd_scan(impl='fla') supports float16/bfloat16/float32 inputs, got {x.dtype}; use impl='torch'")
    return "fla"


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_scan_inputs(x, dt, A, B, C, D, initial_state, cu_seqlens, chunk_size) -> int:
    """Shape checks; returns the number of sequences N (batch, or segments with cu_seqlens)."""
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"ssd_scan: dt must be (batch, seqlen, nheads)={(b, l, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssd_scan: A must be (nheads,)={(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:3]) != (b, l, h):
        raise ValueError(f"ssd_scan: B must be (batch, seqlen, nheads, d_state) with leading dims {(b, l, h)}, got {tuple(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"ssd_scan: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"ssd_scan: D must be (nheads,) or (nheads, headdim), got {tuple(D.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ssd_scan: {name} is on {t.device} but x is on {x.device}")
    nseq = b
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"ssd_scan: cu_seqlens must be a 1-D integer tensor [0, ..., seqlen], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        if b != 1:
            raise ValueError(f"ssd_scan: cu_seqlens needs batch size 1 (pack the sequences along seqlen), got batch {b}")
        # One small device->host copy; the boundaries must cover [0, seqlen] monotonically.
        cu_host = cu_seqlens.detach().cpu()
        first, last, nondecreasing = int(cu_host[0]), int(cu_host[-1]), bool((cu_host.diff() >= 0).all())
        if first != 0 or last != l or not nondecreasing:
            raise ValueError(
                f"ssd_scan: cu_seqlens must be non-decreasing, start at 0 and end at seqlen={l}; "
                f"got first={first}, last={last}, non-decreasing={nondecreasing}"
            )
        nseq = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (nseq, h, p, B.shape[-1]):
        what = "number of segments" if cu_seqlens is not None else "batch"
        raise ValueError(
            f"ssd_scan: initial_state must be ({what}, nheads, headdim, d_state)={(nseq, h, p, B.shape[-1])}, "
            f"got {tuple(initial_state.shape)}"
        )
    return nseq


# --------------------------------------------------------------------------------------------
# Index helpers for packed (cu_seqlens) sequences -- vectorised, no host sync
# --------------------------------------------------------------------------------------------


def _segment_ids(cu_seqlens: torch.Tensor, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every packed position t: (segment id, t). Segment k covers [cu[k], cu[k+1])."""
    t = torch.arange(seqlen, device=cu_seqlens.device, dtype=torch.long)
    # Number of segment ends <= t is the index of the segment containing t (empty segments skipped).
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)
    return seg, t


def _reverse_index(cu_seqlens: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """Gather index that flips time inside every segment (its own inverse); None = plain flip."""
    if cu_seqlens is None:
        return None
    seg, t = _segment_ids(cu_seqlens, seqlen)
    # Position t of segment [s, e) goes to s + e - 1 - t.
    return cu_seqlens[seg] + cu_seqlens[seg + 1] - 1 - t


def _flip_time(v: torch.Tensor, rev_idx: torch.Tensor | None) -> torch.Tensor:
    return torch.flip(v, dims=(1,)) if rev_idx is None else v.index_select(1, rev_idx)


# --------------------------------------------------------------------------------------------
# Pure PyTorch chunked scan
# --------------------------------------------------------------------------------------------


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum_{r=j+1..i} a[..., r] for j <= i, -inf above.

    Built with a masked cumsum rather than cumsum differences, so no cancellation
    (as ``segsum`` in ssd_minimal).
    """
    T = a.size(-1)
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    # [..., i, j] = a_i, kept only where i > j, then summed over i: sum_{j < r <= i} a_r.
    a = a[..., None].expand(*a.shape, T).masked_fill(~torch.tril(ones, diagonal=-1), 0.0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.tril(ones, diagonal=0), float("-inf"))


def _chunk_recurrence(states, log_decay, initial_state):
    """State at the start of every chunk, and the final state, linear in the number of chunks.

    states: (b, c, h, p, n) -- what chunk c alone leaves in the state (started from zero);
    log_decay: (b, h, c) -- total log decay over chunk c; initial_state: (b, h, p, n) or None.
    Recurrence: S_start[0] = S0, S_start[c+1] = exp(log_decay[c]) * S_start[c] + states[c].
    """
    b, nc, h, p, n = states.shape
    g = min(_CHUNK_GROUP, nc)
    pad = (-nc) % g
    if pad:
        # Padding chunks decay by exp(0)=1 and add nothing: the final state is unchanged.
        states = F.pad(states, (0, 0, 0, 0, 0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, pad))
    ng = (nc + pad) // g
    st = states.reshape(b, ng, g, h, p, n)
    ld = log_decay.reshape(b, h, ng, g)

    # Within a group, from a zero group-input state: the state before chunk j (j = 0..g; j = g is
    # the group's end) is sum_{i<j} exp(ld_{i+1} + ... + ld_{j-1}) st_i. With ld' = [0, ld_0..]
    # that weight is exp(segsum(ld')[j, i+1]) (ssd_minimal's step 3, here per group only).
    w = torch.exp(_segsum(F.pad(ld, (1, 0))))[..., :, 1:]  # (b, h, ng, g+1, g)
    local = torch.einsum("bhzji,bzihpn->bzjhpn", w, st)  # (b, ng, g+1, h, p, n)
    # Decay from the group's start to the start of chunk j: exp(ld_0 + ... + ld_{j-1}).
    into = torch.exp(F.pad(torch.cumsum(ld, dim=-1), (1, 0)))  # (b, h, ng, g+1)

    # Sequential over groups only: S_in(z+1) = decay(whole group z) * S_in(z) + local end state.
    s = initial_state if initial_state is not None else states.new_zeros(b, h, p, n)
    group_in = []
    for z in range(ng):
        group_in.append(s)
        s = into[:, :, z, g, None, None] * s + local[:, z, g]
    group_in = torch.stack(group_in, dim=1)  # (b, ng, h, p, n)

    # Start state of chunk j in group z = local part + decayed group input.
    decay_in = into[..., :g].permute(0, 2, 3, 1)[..., None, None]  # (b, ng, g, h, 1, 1)
    starts = local[:, :, :g] + decay_in * group_in[:, :, None]
    return starts.reshape(b, ng * g, h, p, n)[:, :nc], s


def _scan_chunked(x, dt, A, B, C, initial_state, chunk_size):
    """Causal SSD over a batch, all in x's (float32/float64) dtype. Returns y (no D) and S_T."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    if l == 0:  # nothing to scan: the state passes through
        return x.new_zeros(b, 0, h, p), (initial_state if initial_state is not None else x.new_zeros(b, h, p, n))
    # Pad to a whole number of chunks with dt=0, x=0: decay exp(0)=1 and no input, so the
    # state after the padding equals the state after the last real position.
    pad = (-l) % Q
    if pad:
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (l + pad) // Q
    xc = x.reshape(b, nc, Q, h, p)
    Bc = B.reshape(b, nc, Q, h, n)
    Cc = C.reshape(b, nc, Q, h, n)
    dtc = dt.reshape(b, nc, Q, h)

    # Discretise: log decay a_t = dt_t * A (<= 0) and input dt_t * x_t.
    a = (dtc * A).permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cum = torch.cumsum(a, dim=-1)
    xdt = xc * dtc[..., None]  # (b, c, l, h, p)

    # 1. Intra-chunk (diagonal blocks): y_t += sum_{s<=t} exp(a_{s+1}+..+a_t) (C_t.B_s) dt_s x_s.
    decay_ts = torch.exp(_segsum(a))  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay_ts
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. State each chunk leaves on its own: sum_s exp(a_{s+1}+..+a_end) dt_s x_s (x) B_s.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    B_decayed = Bc * decay_to_end.permute(0, 2, 3, 1)[..., None]  # (b, c, l, h, n)
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", B_decayed, xdt)

    # 3. Inter-chunk recurrence -> state entering each chunk (linear in the number of chunks).
    start_states, final_state = _chunk_recurrence(chunk_states, a_cum[..., -1], initial_state)

    # 4. Off-diagonal blocks: y_t += exp(a_0+..+a_t) C_t . S_start(chunk).
    C_decayed = Cc * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]  # (b, c, l, h, n)
    y_off = torch.einsum("bclhn,bchpn->bclhp", C_decayed, start_states)

    y = (y_diag + y_off).reshape(b, nc * Q, h, p)[:, :l]
    return y, final_state


def _scan_torch(x, dt, A, B, C, initial_state, cu_seqlens, chunk_size, cdt):
    """Causal scan in dtype ``cdt``; packed sequences are scattered into a padded batch."""
    x, dt, A, B, C = (v.to(cdt) for v in (x, dt, A, B, C))
    s0 = None if initial_state is None else initial_state.to(cdt)
    if cu_seqlens is None:
        return _scan_chunked(x, dt, A, B, C, s0, chunk_size)

    l = x.shape[1]
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    nseg = cu.numel() - 1
    # Host-side size of the padded batch (one device->host read).
    maxlen = max(int((cu[1:] - cu[:-1]).max()), 1)
    seg, t = _segment_ids(cu, l)
    pos = t - cu[seg]

    # Scatter packed (1, L, ...) into (nseg, maxlen, ...); the zero tail of each row has dt=0,
    # so it leaves that segment's final state untouched. index_put is differentiable.
    def to_padded(v):
        return v.new_zeros((nseg, maxlen) + tuple(v.shape[2:])).index_put((seg, pos), v[0])

    y_pad, final_state = _scan_chunked(*(to_padded(v) for v in (x, dt)), A, *(to_padded(v) for v in (B, C)), s0, chunk_size)
    return y_pad[seg, pos].unsqueeze(0), final_state


# --------------------------------------------------------------------------------------------
# fla-core backend
# --------------------------------------------------------------------------------------------


def _scan_fla(x, dt, A, B, C, initial_state, cu_seqlens, want_state):
    """Causal scan through fla's chunk_simple_gla (q=C, k=B, v=dt*x, g=dt*A, scale=1)."""
    from fla.ops.simple_gla import chunk_simple_gla  # lazy: needs triton and a GPU

    dtype = x.dtype
    q = C.to(dtype)
    k = B.to(dtype)
    v = (x.float() * dt.float()[..., None]).to(dtype)
    g = dt.float() * A.float()[None, None, :]
    # fla keeps states as (N, H, K=d_state, V=headdim): transpose ours (headdim, d_state).
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2)
    cu = None if cu_seqlens is None else cu_seqlens.to(device=x.device, dtype=torch.long)
    o, ht = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=h0, output_final_state=want_state, cu_seqlens=cu)
    return o, (None if ht is None else ht.transpose(-1, -2))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    reverse: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
):
    """Mamba2 SSD scan (scalar decay per head) over whole sequences.

    Recurrence per batch row and head, with ``S`` of shape (headdim, d_state)::

        S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)
        y_t = S_t @ C_t + D * x_t

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), already positive (no softplus is applied here).
        A: (nheads,), negative.
        B, C: (batch, seqlen, nheads, d_state) (expand Mamba2's groups to heads first).
        D: (nheads,) or (nheads, headdim) skip weight, or None.
        initial_state: state before the first processed position, (batch, nheads, headdim,
            d_state); with ``cu_seqlens`` one row per segment. Default zeros.
        return_final_state: also return the state after the last processed position.
        cu_seqlens: 1-D int64 boundaries ``[0, ..., seqlen]`` of packed sequences (batch must
            be 1). Every segment is scanned independently (state reset at each boundary).
        reverse: run the recurrence from the last position to the first
            (``S_t = exp(dt_t A) S_{t+1} + dt_t x_t B_t^T``; per segment with cu_seqlens);
            the final state is then the one after processing position 0.
        chunk_size: chunk length of the torch implementation (fla uses its own, 64).
        impl: ``"torch"`` (chunked PyTorch, any device/dtype, math in float32 -- float64 if x
            is float64), ``"fla"`` (fla-core Triton kernel, CUDA, fp16/bf16/fp32) or ``"auto"``
            (fla when on CUDA and importable, else torch; also torch, with a warning, when a
            gradient is needed and fla-core refuses its backward on this GPU/Triton, see
            ``_fla_backward_blocked``).

    Returns:
        y with x's dtype and shape, or ``(y, final_state)`` when ``return_final_state``;
        final_state is (batch or nseg, nheads, headdim, d_state) in float32 (float64 for
        float64 inputs on the torch path).

    The torch path with ``cu_seqlens`` scans a zero-padded (nseg, max segment length) batch
    and reads ``max(len)`` on the host once.

    Example::

        >>> b, l, h, p, n = 2, 100, 4, 16, 8
        >>> x = torch.randn(b, l, h, p)
        >>> dt = F.softplus(torch.randn(b, l, h))
        >>> A = -torch.rand(h) - 0.5
        >>> B, C = torch.randn(b, l, h, n), torch.randn(b, l, h, n)
        >>> y, S = ssd_scan(x, dt, A, B, C, torch.ones(h), return_final_state=True)
        >>> y.shape, S.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 16, 8]))
    """
    _check_scan_inputs(x, dt, A, B, C, D, initial_state, cu_seqlens, chunk_size)
    tensors = (x, dt, A, B, C, D, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    impl = _resolve_impl(impl, x, needs_grad)
    l = x.shape[1]

    # reverse: flip time (per segment), run the causal scan, flip y back. The flip index is
    # its own inverse and is built on the device without a host sync.
    rev_idx = None
    if reverse and cu_seqlens is not None:
        rev_idx = _reverse_index(cu_seqlens.to(device=x.device, dtype=torch.long), l)
    xs, dts, Bs, Cs = (_flip_time(v, rev_idx) for v in (x, dt, B, C)) if reverse else (x, dt, B, C)

    if impl == "fla":
        cdt = torch.float32
        y, final_state = _scan_fla(xs, dts, A, Bs, Cs, initial_state, cu_seqlens, return_final_state)
    else:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        y, final_state = _scan_torch(xs, dts, A, Bs, Cs, initial_state, cu_seqlens, chunk_size, cdt)
    if reverse:
        y = _flip_time(y, rev_idx)

    # Skip connection D * x, added in the compute dtype, then cast to x's dtype.
    if D is not None:
        Dc = D.to(cdt)
        y = y.to(cdt) + (Dc[:, None] if Dc.dim() == 1 else Dc) * x.to(cdt)
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the SSD recurrence (decoding). No host sync, static shapes.

    Args:
        state: (batch, nheads, headdim, d_state), float32 (not modified unless it is ``out``).
        x: (batch, nheads, headdim).
        dt: (batch, nheads), already positive.
        A: (nheads,), negative.
        B, C: (batch, nheads, d_state).
        D: (nheads,) or (nheads, headdim), or None.
        out: a contiguous tensor of the state's shape and compute dtype to write the new state into, e.g.
            ``state`` itself (a decode cache updated in place: no state-sized temporaries and no copy back; the
            torch path still reads and writes the state twice, the fused kernel once). None: a new tensor.
        impl: ``"auto"``: an in-place update (``out is state``) of a float32 CUDA state runs the fused Triton kernel
            of :mod:`linmu.ops.ssd_decode` (one read and one write of the state) when Triton is importable and
            ``LINMU_FUSED_SSD_STEP`` is not ``0``; ``"torch"``: always the PyTorch path below.

    Returns:
        ``(y, new_state)``: y (batch, nheads, headdim) in x's dtype, new_state float32
        (float64 if x or state is float64; ``out`` when given). Math is done in that dtype.

    Example::

        >>> S = torch.zeros(1, 2, 4, 3)
        >>> y, S = ssd_step(S, torch.randn(1, 2, 4), torch.rand(1, 2), -torch.ones(2),
        ...                 torch.randn(1, 2, 3), torch.randn(1, 2, 3))
        >>> y.shape, S.shape
        (torch.Size([1, 2, 4]), torch.Size([1, 2, 4, 3]))
    """
    b, h, p = x.shape
    n = B.shape[-1]
    if tuple(state.shape) != (b, h, p, n) or tuple(dt.shape) != (b, h) or tuple(A.shape) != (h,) \
            or tuple(B.shape) != (b, h, n) or tuple(C.shape) != (b, h, n):
        raise ValueError(
            "ssd_step: expected state (b,h,p,n), x (b,h,p), dt (b,h), A (h,), B/C (b,h,n); got "
            f"state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if impl not in ("auto", "torch"):
        raise ValueError(f"ssd_step: impl must be 'auto' or 'torch', got {impl!r}")
    cdt = torch.float64 if torch.float64 in (x.dtype, state.dtype) else torch.float32
    if impl == "auto" and out is state and cdt == torch.float32:
        from .ssd_decode import fused_step_enabled, fused_step_supported, ssd_step_inplace

        if fused_step_enabled() and fused_step_supported(state, D):
            return ssd_step_inplace(state, x, dt, A, B, C, D), state
    dtc = dt.to(cdt)
    xc = x.to(cdt)
    # S' = exp(dt A) S + dt x (x) B
    decay = torch.exp(dtc * A.to(cdt))  # (b, h)
    if out is None:
        new_state = state.to(cdt) * decay[..., None, None] + (xc * dtc[..., None])[..., :, None] * B.to(cdt)[..., None, :]
    else:
        if tuple(out.shape) != (b, h, p, n) or out.dtype != cdt or not out.is_contiguous():
            raise ValueError(f"ssd_step: out must be a contiguous {cdt} tensor of shape {(b, h, p, n)}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        new_state = torch.mul(state.to(cdt), decay[..., None, None], out=out)
        new_state.addcmul_((xc * dtc[..., None])[..., :, None], B.to(cdt)[..., None, :])
    # y = S' C + D x
    y = torch.matmul(new_state, C.to(cdt)[..., None]).squeeze(-1)
    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * xc
    return y.to(x.dtype), new_state
