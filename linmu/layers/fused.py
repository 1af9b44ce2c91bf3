"""Fused elementwise steps of the M-MATE prefill (inference only, no autograd).

Each step has two implementations with one signature: a Triton kernel (CUDA tensors, Triton importable) and a
plain PyTorch reference (any device), chosen by ``impl`` ("auto": Triton on CUDA when available). The GPU tests
compare the two; the CPU tests run the whole fused prefill on the references.

* :func:`conv_scan_inputs` -- Flex-MA's short depthwise conv + SiLU over the x/B/C channels, read through a row
  index (the Rotary Major-Scan order, or the reversed visual spans of the backward scan) with the padding mask,
  written straight in the layout of fla's simple-GLA scan: ``q = C``, ``k = B`` and ``v = dt * x`` repeated over the
  GQA group, plus ``x`` at key/value width and optionally the diagonal term ``dt * (C . B)`` of the backward scan.
* :func:`combine_gated_norm` -- both scan directions back in token order (forward + D skip, backward - diagonal
  + D skip at visual tokens), Mamba2's gated RMSNorm with ``z`` and the norm weight, written into a strided output.
* :func:`rope_gather` -- Local-Swin's rotary embedding applied while gathering q/k (and copying v) into the window
  order of :func:`linmu.ops.window_attention.window_attention_sorted`.

All math is float32 inside; outputs are rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["triton_available", "conv_scan_inputs", "combine_gated_norm", "rope_gather"]

_ROWS = 32  # rows per Triton program


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no driver
        return None
    return triton, tl


def triton_available() -> bool:
    return _triton() is not None


def _use_triton(impl: str, t: torch.Tensor) -> bool:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    ok = t.is_cuda and triton_available()
    if impl == "triton" and not ok:
        raise RuntimeError("impl='triton' needs CUDA tensors and an importable Triton")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (defined on first use, so that importing this module never needs Triton)
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernels():
    triton, tl = _triton()

    @triton.jit
    def conv_kernel(raw, stride_raw, src, segpos, valid, w, bias, dt, q_out, k_out, v_out, x_out, diag_out, R,
                    G: tl.constexpr, P: tl.constexpr, REP: tl.constexpr, K: tl.constexpr,
                    HAS_VALID: tl.constexpr, WANT_DIAG: tl.constexpr, BR: tl.constexpr):
        # one program per (head, block of rows); heads vary fastest, so the REP programs of a group that read the
        # same x/B rows run together and share them through L2
        h = tl.program_id(0)
        pid = tl.program_id(1)
        H = G * REP
        g = h // REP
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < R
        p = tl.arange(0, P)
        sp = tl.load(segpos + rows, mask=rmask, other=0)
        cx = g * P + p
        cb = G * P + g * P + p
        cc = 2 * G * P + h * P + p
        acc_x = tl.zeros([BR, P], dtype=tl.float32) + tl.load(bias + cx).to(tl.float32)[None, :]
        acc_b = tl.zeros([BR, P], dtype=tl.float32) + tl.load(bias + cb).to(tl.float32)[None, :]
        acc_c = tl.zeros([BR, P], dtype=tl.float32) + tl.load(bias + cc).to(tl.float32)[None, :]
        for j in tl.static_range(K):
            ok = rmask & (sp >= j)
            s = tl.load(src + rows - j, mask=ok, other=0).to(tl.int64)
            base = raw + s[:, None] * stride_raw
            xr = tl.load(base + cx[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            br = tl.load(base + cb[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            cr = tl.load(base + cc[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            if HAS_VALID:
                vm = tl.load(valid + s, mask=ok, other=0).to(tl.float32)[:, None]
                xr = xr * vm
                br = br * vm
                cr = cr * vm
            acc_x += xr * tl.load(w + cx * K + (K - 1 - j)).to(tl.float32)[None, :]
            acc_b += br * tl.load(w + cb * K + (K - 1 - j)).to(tl.float32)[None, :]
            acc_c += cr * tl.load(w + cc * K + (K - 1 - j)).to(tl.float32)[None, :]
        x = acc_x * tl.sigmoid(acc_x)
        b = acc_b * tl.sigmoid(acc_b)
        c = acc_c * tl.sigmoid(acc_c)
        rows64 = rows.to(tl.int64)
        if h % REP == 0:
            tl.store(x_out + rows64[:, None] * (G * P) + cx[None, :], x.to(x_out.dtype.element_ty),
                     mask=rmask[:, None])
        dth = tl.load(dt + rows64 * H + h, mask=rmask, other=0.0)
        off = rows64[:, None] * (H * P) + h * P + p[None, :]
        tl.store(q_out + off, c.to(q_out.dtype.element_ty), mask=rmask[:, None])
        tl.store(k_out + off, b.to(k_out.dtype.element_ty), mask=rmask[:, None])
        tl.store(v_out + off, (x * dth[:, None]).to(v_out.dtype.element_ty), mask=rmask[:, None])
        if WANT_DIAG:
            tl.store(diag_out + rows64 * H + h, dth * tl.sum(c * b, axis=1), mask=rmask)

    @triton.jit
    def combine_kernel(out, stride_out, z, stride_z, o_f, x_f, D_f, fwd_row, o_b, x_b, diag_b, D_b, bwd_row,
                       norm_w, eps, N, G: tl.constexpr, P: tl.constexpr, REP: tl.constexpr,
                       HAS_BWD: tl.constexpr, BR: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        H = G * REP
        g = h // REP
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < N
        p = tl.arange(0, P)
        s = tl.load(fwd_row + rows, mask=rmask, other=0).to(tl.int64)
        y = tl.load(o_f + s[:, None] * (H * P) + h * P + p[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        xf = tl.load(x_f + s[:, None] * (G * P) + g * P + p[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        y += tl.load(D_f + h).to(tl.float32) * xf
        if HAS_BWD:
            rb = tl.load(bwd_row + rows, mask=rmask, other=-1).to(tl.int64)
            mb = rmask & (rb >= 0)
            rb = tl.where(mb, rb, 0)
            ob = tl.load(o_b + rb[:, None] * (H * P) + h * P + p[None, :], mask=mb[:, None], other=0.0).to(tl.float32)
            xb = tl.load(x_b + rb[:, None] * (G * P) + g * P + p[None, :], mask=mb[:, None], other=0.0).to(tl.float32)
            dg = tl.load(diag_b + rb * H + h, mask=mb, other=0.0)
            y += ob + (tl.load(D_b + h).to(tl.float32) - dg[:, None]) * xb
        rows64 = rows.to(tl.int64)
        zz = tl.load(z + rows64[:, None] * stride_z + h * P + p[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        y = y * (zz * tl.sigmoid(zz))
        ms = tl.sum(y * y, axis=1) / P
        y = y * tl.rsqrt(ms + eps)[:, None] * tl.load(norm_w + h * P + p).to(tl.float32)[None, :]
        tl.store(out + rows64[:, None] * stride_out + h * P + p[None, :], y.to(out.dtype.element_ty),
                 mask=rmask[:, None])

    @triton.jit
    def rope_kernel(x, stride_row, stride_head, order, cos, sin, stride_cs, out, N,
                    NH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr,
                    BR: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BR + tl.arange(0, BR)
        rmask = rows < N
        t = tl.load(order + rows, mask=rmask, other=0).to(tl.int64)
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, HALF)
        src = x + t[:, None] * stride_row + h * stride_head
        dst = out + rows64[:, None] * (NH * D) + h * D
        x1 = tl.load(src + d[None, :], mask=rmask[:, None], other=0.0)
        x2 = tl.load(src + HALF + d[None, :], mask=rmask[:, None], other=0.0)
        if ROPE:
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            cbase = t[:, None] * stride_cs + d[None, :]
            c1 = tl.load(cos + cbase, mask=rmask[:, None], other=0.0).to(tl.float32)
            c2 = tl.load(cos + cbase + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
            s1 = tl.load(sin + cbase, mask=rmask[:, None], other=0.0).to(tl.float32)
            s2 = tl.load(sin + cbase + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        else:
            y1 = x1
            y2 = x2
        tl.store(dst + d[None, :], y1.to(out.dtype.element_ty), mask=rmask[:, None])
        tl.store(dst + HALF + d[None, :], y2.to(out.dtype.element_ty), mask=rmask[:, None])

    return dict(conv=conv_kernel, combine=combine_kernel, rope=rope_kernel)


def _grid_rows(n: int, rows: int = _ROWS) -> int:
    return max(1, -(-n // rows))


# ----------------------------------------------------------------------------------------------------------------
# Short conv + SiLU -> scan inputs
# ----------------------------------------------------------------------------------------------------------------


def conv_scan_inputs(raw: torch.Tensor, src: torch.Tensor, segpos: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, valid: torch.Tensor | None, dt: torch.Tensor, num_kv_heads: int,
                     head_dim: int, want_diag: bool = False, impl: str = "auto"):
    """Depthwise causal conv + SiLU along a row order, written as the inputs of one simple-GLA scan.

    Args:
        raw: (N, C) pre-conv channels ``[x (G*P) | B (G*P) | C (H*P)]`` of N tokens (row stride free, unit
            column stride), e.g. a column slice of the fused projection output.
        src: (R,) long, the token (row of ``raw``) at each output row, in scan order.
        segpos: (R,) long, position of each output row inside its segment; tap ``j`` (the row ``j`` steps
            earlier in this order) contributes only when ``j <= segpos``, so the conv restarts at segment starts.
        weight, bias: (C, K), (C,) conv taps (tap ``K - 1`` is the current row) and bias.
        valid: (N,) bool or None: ``raw`` rows of padding tokens count as zeros.
        dt: (R, H) float32 step sizes at the output rows.
        num_kv_heads, head_dim: G and P (H = C // P - 2 G).

    Returns:
        ``(q, k, v, x, diag)``: q = C, k = B repeated over the group, v = dt * x repeated, each (R, H, P) in
        ``raw.dtype``; x (R, G, P); diag (R, H) float32 ``dt * (C . B)`` or None.
    """
    R = src.numel()
    C = raw.shape[1]
    G, P = num_kv_heads, head_dim
    H = C // P - 2 * G
    K = weight.shape[1]
    if _use_triton(impl, raw):
        if raw.stride(1) != 1:
            raise ValueError("raw must have unit column stride")
        kern = _kernels()["conv"]
        q = raw.new_empty(R, H, P)
        k = raw.new_empty(R, H, P)
        v = raw.new_empty(R, H, P)
        x = raw.new_empty(R, G, P)
        diag = torch.empty(R, H, dtype=torch.float32, device=raw.device) if want_diag else None
        if R > 0:
            br = _ROWS
            while _grid_rows(R, br) > 65535:  # CUDA's limit on the second grid axis (~2M rows at 32 per program)
                br *= 2
            kern[(H, _grid_rows(R, br))](
                raw, raw.stride(0), src, segpos, valid if valid is not None else src, weight.contiguous(),
                bias.contiguous(), dt.contiguous(), q, k, v, x, diag if diag is not None else dt, R,
                G=G, P=P, REP=H // G, K=K, HAS_VALID=valid is not None, WANT_DIAG=want_diag, BR=br,
                num_warps=4 if br <= 32 else 8)
        return q, k, v, x, diag
    rows = raw.index_select(0, src).float()
    if valid is not None:
        rows = rows * valid.index_select(0, src).to(rows.dtype)[:, None]
    acc = rows * weight[:, K - 1].float() + bias.float()
    for j in range(1, K):
        shifted = F.pad(rows[:-j] if j < R else rows[:0], (0, 0, min(j, R), 0))
        acc = acc + shifted * (segpos >= j).to(rows.dtype)[:, None] * weight[:, K - 1 - j].float()
    act = F.silu(acc)
    xg, bg, c = act.split([G * P, G * P, H * P], dim=-1)
    rep = H // G
    xg, bg, c = xg.reshape(R, G, P), bg.reshape(R, G, P), c.reshape(R, H, P)
    b_h = bg.repeat_interleave(rep, dim=1)
    x_h = xg.repeat_interleave(rep, dim=1)
    diag = dt * (c * b_h).sum(-1) if want_diag else None
    dtype = raw.dtype
    return c.to(dtype), b_h.to(dtype), (x_h * dt[..., None]).to(dtype), xg.to(dtype), diag


# ----------------------------------------------------------------------------------------------------------------
# Both directions + gated RMSNorm
# ----------------------------------------------------------------------------------------------------------------


def combine_gated_norm(out: torch.Tensor, z: torch.Tensor, o_f: torch.Tensor, x_f: torch.Tensor,
                       D_f: torch.Tensor, fwd_row: torch.Tensor, o_b: torch.Tensor | None, x_b: torch.Tensor | None,
                       diag_b: torch.Tensor | None, D_b: torch.Tensor | None, bwd_row: torch.Tensor | None,
                       norm_weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """Flex-MA's core output in token order: ``norm(y * silu(z)) * norm_weight`` per head, written into ``out``.

    ``y = o_f + D_f x_f`` at the token's forward-scan row ``fwd_row``, plus ``o_b - diag_b x_b + D_b x_b`` at its
    backward-scan row ``bwd_row`` (``-1``: none, text tokens).

    Args:
        out: (N, H*P) destination (row stride free), N tokens in flat order.
        z: (N, H*P) output gate (row stride free).
        o_f: (R, H, P) forward scan output; x_f: (R, G, P); D_f: (H,); fwd_row: (N,) long.
        o_b, x_b, diag_b, D_b, bwd_row: the backward scan's (Rb, H, P), (Rb, G, P), (Rb, H) float32, (H,),
            (N,) long; all None without a backward scan.
        norm_weight: (H*P,); eps: RMSNorm epsilon.
    """
    N = fwd_row.numel()
    H, P = o_f.shape[1:]
    G = x_f.shape[1]
    has_bwd = o_b is not None
    if _use_triton(impl, out):
        if out.stride(1) != 1 or z.stride(1) != 1:
            raise ValueError("out and z must have unit column stride")
        if N > 0:
            kern = _kernels()["combine"]
            dummy = o_f
            kern[(_grid_rows(N), H)](
                out, out.stride(0), z, z.stride(0), o_f.contiguous(), x_f.contiguous(), D_f, fwd_row,
                o_b.contiguous() if has_bwd else dummy, x_b.contiguous() if has_bwd else dummy,
                diag_b.contiguous() if has_bwd else dummy, D_b if has_bwd else D_f,
                bwd_row if has_bwd else fwd_row, norm_weight, float(eps), N,
                G=G, P=P, REP=H // G, HAS_BWD=has_bwd, BR=_ROWS, num_warps=4)
        return out
    rep = H // G
    y = o_f.index_select(0, fwd_row).float()
    y = y + D_f.float()[:, None] * x_f.index_select(0, fwd_row).float().repeat_interleave(rep, dim=1)
    if has_bwd:
        hit = bwd_row >= 0
        rb = bwd_row.clamp(min=0)
        xb = x_b.index_select(0, rb).float().repeat_interleave(rep, dim=1)
        yb = o_b.index_select(0, rb).float() + (D_b.float()[None, :, None] - diag_b.index_select(0, rb)[..., None]) * xb
        y = y + yb * hit[:, None, None].to(yb.dtype)
    y = y * F.silu(z.float().reshape(N, H, P))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_((y.reshape(N, H * P) * norm_weight.float()).to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# RoPE + gather into window order
# ----------------------------------------------------------------------------------------------------------------


def rope_gather(x: torch.Tensor, order: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                impl: str = "auto") -> torch.Tensor:
    """``out[r] = rope(x[order[r]])`` (or a plain gather without ``cos``/``sin``).

    Args:
        x: (N, NH, D) (row and head strides free, unit last stride), N tokens in flat order.
        order: (N,) long, the token at each output row.
        cos, sin: (N, D) rotary tables of the tokens (as ``apply_rope``: ``x * cos + rotate_half(x) * sin``), or
            None for a plain gather.

    Returns:
        (N, NH, D) contiguous in ``x.dtype``.
    """
    N = order.numel()
    NH, D = x.shape[1:]
    rope = cos is not None
    if _use_triton(impl, x):
        if x.stride(2) != 1:
            raise ValueError("x must have unit last stride")
        out = x.new_empty(N, NH, D)
        if N > 0:
            cs, sn = (cos.contiguous(), sin.contiguous()) if rope else (x, x)
            _kernels()["rope"][(_grid_rows(N), NH)](
                x, x.stride(0), x.stride(1), order, cs, sn, cs.stride(0) if rope else 0, out, N,
                NH=NH, D=D, HALF=D // 2, ROPE=rope, BR=_ROWS, num_warps=4)
        return out
    g = x.index_select(0, order)
    if not rope:
        return g.contiguous()
    c = cos.index_select(0, order).float()[:, None]
    s = sin.index_select(0, order).float()[:, None]
    gf = g.float()
    x1, x2 = gf.chunk(2, dim=-1)
    return (gf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)
