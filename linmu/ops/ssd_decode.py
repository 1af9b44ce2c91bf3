"""One fused SSD decode step in Triton: a decode cache's state is read once and written once.

``S <- exp(dt A) S + dt x (x) B`` and ``y = S C + D x`` per (sequence, head), with the state tile kept in registers
between the update and the read-out. The torch path of :func:`linmu.ops.ssd.ssd_step` does the same math in three
passes over the state plus two writes; at a large decode batch the state traffic is most of a LinMU decode step.
:func:`linmu.ops.ssd.ssd_step` calls this for an in-place CUDA update (``out=state``) when Triton is importable;
the GPU tests compare both paths. The kernel is defined on first use, so importing this module never needs Triton.
"""

from __future__ import annotations

import functools
import os

import torch

_BLOCK_P = 32  # state rows (headdim) per program; a program holds a (32, d_state) float32 tile


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no driver
        return None

    @triton.jit
    def ssd_step_kernel(S, X, DT, A, Bm, Cm, D, Y, H, P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr,
                        HAS_D: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)  # sequence * H + head
        rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, N)
        h = bh % H
        dt = tl.load(DT + bh)
        decay = tl.exp(dt * tl.load(A + h))
        x = tl.load(X + bh * P + rows).to(tl.float32)
        b = tl.load(Bm + bh * N + cols).to(tl.float32)
        c = tl.load(Cm + bh * N + cols).to(tl.float32)
        ptr = S + bh * P * N + rows[:, None] * N + cols[None, :]
        s = tl.load(ptr) * decay + (x * dt)[:, None] * b[None, :]
        tl.store(ptr, s)
        y = tl.sum(s * c[None, :], axis=1)
        if HAS_D:
            y += tl.load(D + h) * x
        tl.store(Y + bh * P + rows, y)

    return triton, ssd_step_kernel


def fused_step_enabled() -> bool:
    """False when the environment sets ``LINMU_FUSED_SSD_STEP=0`` (then ``impl="auto"`` keeps the torch step)."""
    return os.environ.get("LINMU_FUSED_SSD_STEP", "1") != "0"


def fused_step_supported(state: torch.Tensor, D: torch.Tensor | None) -> bool:
    """Whether `ssd_step_inplace` can run: a contiguous float32 CUDA state (b, h, p, n) with p and n powers of two
    (p >= 32, n <= 256), D per head or None, and Triton importable."""
    if not (state.is_cuda and state.dtype == torch.float32 and state.is_contiguous()):
        return False
    p, n = state.shape[-2:]
    if p % _BLOCK_P or p & (p - 1) or n & (n - 1) or n > 256:
        return False
    if D is not None and D.dim() != 1:
        return False
    return _kernel() is not None


def ssd_step_inplace(state, x, dt, A, B, C, D=None) -> torch.Tensor:
    """Update ``state`` (b, h, p, n) float32 in place by one token and return y (b, h, p) in x's dtype.

    Same arguments as :func:`linmu.ops.ssd.ssd_step` (dt already positive, A negative); no host sync, static
    shapes (capturable in a CUDA graph). Call only when `fused_step_supported` says so.
    """
    _, kernel = _kernel()
    b, h, p, n = state.shape
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    Df = D.float().contiguous() if D is not None else state  # an unused pointer when D is None
    kernel[(b * h, p // _BLOCK_P)](state, x.contiguous(), dt.float().contiguous(), A.float().contiguous(),
                                   B.contiguous(), C.contiguous(), Df, y, h, P=p, N=n, BLOCK_P=_BLOCK_P,
                                   HAS_D=D is not None)
    return y
