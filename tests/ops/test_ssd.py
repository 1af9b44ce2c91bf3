"""Tests for linmu.ops.ssd (Mamba2 SSD scan and single step).

The reference is a quadratic float64 oracle written from the formula

    M[t, s] = exp(sum_{r=s+1..t} dt_r A) * dt_s * (C_t . B_s)          (s <= t)
    y_t     = sum_s M[t, s] x_s + D x_t + C_t . (exp(sum_{r<=t} dt_r A) S0)
    S_T     = sum_s exp(sum_{r=s+1..T} dt_r A) dt_s x_s B_s^T + exp(sum_{r<=T} dt_r A) S0

applied per segment (explicit slicing) and on a flipped copy for reverse; it is itself checked
against a plain Python-loop recurrence that runs backwards for reverse and resets per segment.

CPU only, except the tests marked ``gpu`` (fla vs torch in bf16), which skip without CUDA.
They can run alone on a GPU machine: ``pytest -m gpu tests/ops/test_ssd.py`` or
``python tests/ops/test_ssd.py``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from linmu.ops.ssd import ssd_scan, ssd_step

KEYS = ("x", "dt", "A", "B", "C", "D", "S0")


# --------------------------------------------------------------------------------------------
# Inputs and oracles
# --------------------------------------------------------------------------------------------


def make_inputs(b, l, h, p, n, *, s0=True, d=True, nstates=None, seed=0, device="cpu"):
    """Fresh float64 inputs. dt*A is about -0.05 per step, so memory spans tens of steps and
    crosses chunk boundaries (chunk 16) and segment boundaries."""
    g = torch.Generator().manual_seed(seed)
    inp = {
        "x": torch.randn(b, l, h, p, generator=g, dtype=torch.float64),
        "dt": F.softplus(torch.randn(b, l, h, generator=g, dtype=torch.float64) - 1.5),
        "A": -(torch.rand(h, generator=g, dtype=torch.float64) * 0.5 + 0.05),
        "B": torch.randn(b, l, h, n, generator=g, dtype=torch.float64) / math.sqrt(n),
        "C": torch.randn(b, l, h, n, generator=g, dtype=torch.float64),
        "D": torch.randn(h, generator=g, dtype=torch.float64) if d else None,
        "S0": torch.randn(nstates or b, h, p, n, generator=g, dtype=torch.float64) if s0 else None,
    }
    return {k: (None if v is None else v.to(device)) for k, v in inp.items()}


def leaves(inp, dtype=None, lowp=None, device=None):
    """Detached copies that require grad. ``lowp`` casts x, dt, B, C only (A, D, S0 stay f32)."""
    out = {}
    for k, v in inp.items():
        if v is None:
            out[k] = None
            continue
        t = v.detach()
        if device is not None:
            t = t.to(device)
        if lowp is not None:
            t = t.to(lowp if k in ("x", "dt", "B", "C") else torch.float32)
        elif dtype is not None:
            t = t.to(dtype)
        out[k] = t.clone().requires_grad_(True)
    return out


def oracle_causal(x, dt, A, B, C, D, S0):
    """Quadratic float64 oracle of one causal scan over a batch (formula in the module doc)."""
    l = x.shape[1]
    cum = torch.cumsum(dt * A, dim=1)  # (b, l, h): sum_{r<=t} dt_r A
    cum_h = cum.transpose(1, 2)  # (b, h, l)
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    # log decay from s to t = cum_t - cum_s (masked to -inf above the diagonal before exp)
    decay = torch.exp((cum_h[..., :, None] - cum_h[..., None, :]).masked_fill(~causal, float("-inf")))
    M = decay * torch.einsum("bthn,bshn->bhts", C, B) * dt.transpose(1, 2)[:, :, None, :]
    y = torch.einsum("bhts,bshp->bthp", M, x)
    w_end = torch.exp(cum[:, -1:, :] - cum) * dt  # (b, l, h)
    S = torch.einsum("bsh,bshp,bshn->bhpn", w_end, x, B)
    if S0 is not None:
        y = y + torch.einsum("bthn,bhpn->bthp", C, S0) * torch.exp(cum)[..., None]
        S = S + torch.exp(cum[:, -1])[..., None, None] * S0
    if D is not None:
        y = y + D[:, None] * x
    return y, S


def _bounds(cu, l):
    return [(0, l)] if cu is None else list(zip(cu[:-1], cu[1:]))


def oracle(inp, cu=None, reverse=False):
    """Quadratic oracle with explicit per-segment slicing and flipping; all in float64."""
    x, dt, A, B, C, D, S0 = (None if inp[k] is None else inp[k].double() for k in KEYS)
    b, l, h, p = x.shape
    n = B.shape[-1]
    ys, Ss = [], []
    for k, (s, e) in enumerate(_bounds(cu, l)):
        s0 = S0 if cu is None else (None if S0 is None else S0[k : k + 1])
        if e == s:  # empty segment: no output, state passes through
            ys.append(x[:, s:e])
            Ss.append(s0 if s0 is not None else x.new_zeros(1, h, p, n))
            continue
        seg = [v[:, s:e] for v in (x, dt, B, C)]
        if reverse:
            seg = [v.flip(1) for v in seg]
        y, S = oracle_causal(seg[0], seg[1], A, seg[2], seg[3], D, s0)
        ys.append(y.flip(1) if reverse else y)
        Ss.append(S)
    return torch.cat(ys, dim=1), torch.cat(Ss, dim=0)


def oracle_loop(inp, cu=None, reverse=False):
    """Plain float64 recurrence: steps backwards for reverse, restarts at each segment."""
    x, dt, A, B, C, D, S0 = (None if inp[k] is None else inp[k].double() for k in KEYS)
    b, l, h, p = x.shape
    n = B.shape[-1]
    y = torch.zeros_like(x)
    finals = []
    for k, (s, e) in enumerate(_bounds(cu, l)):
        S = (S0 if cu is None else S0[k : k + 1]) if S0 is not None else x.new_zeros(b, h, p, n)
        for t in (range(e - 1, s - 1, -1) if reverse else range(s, e)):
            S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            y[:, t] = torch.einsum("bhpn,bhn->bhp", S, C[:, t]) + (0 if D is None else D[:, None] * x[:, t])
        finals.append(S)
    return y, torch.cat(finals, dim=0)


def run_scan(inp, **kw):
    return ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"],
                    initial_state=inp["S0"], return_final_state=True, **kw)


def grads_of(y, S, inp, gy, gS):
    """d/d(inputs) of <y, gy> + <S, gS>, in float64, for every input that requires grad."""
    names = [k for k in KEYS if inp[k] is not None]
    loss = (y.double() * gy).sum() + (S.double() * gS).sum()
    return dict(zip(names, torch.autograd.grad(loss, [inp[k] for k in names])))


def rel_err(a, ref):
    """max|a - ref| / max(max|ref|, 1e-30): error relative to the output's scale."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_against_oracle(inp_ref, inp_test, tol, *, cu=None, reverse=False, **kw):
    """Forward and backward of ssd_scan(inp_test) vs the oracle on inp_ref; returns max errors."""
    y_ref, S_ref = oracle(inp_ref, cu, reverse)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.long)
    y, S = run_scan(inp_test, cu_seqlens=cu_t, reverse=reverse, **kw)
    assert y.dtype == inp_test["x"].dtype and y.shape == inp_test["x"].shape
    assert S.shape == S_ref.shape
    errs = {"y": rel_err(y, y_ref), "S": rel_err(S, S_ref)}
    gy, gS = torch.randn_like(y_ref), torch.randn_like(S_ref)
    g_ref = grads_of(y_ref, S_ref, inp_ref, gy, gS)
    g = grads_of(y, S, inp_test, gy, gS)
    for k in g_ref:
        assert g[k].dtype == inp_test[k].dtype
        errs["d" + k] = rel_err(g[k], g_ref[k])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"
    return errs


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 7, 20, 21, 37]])
def test_oracle_matches_loop_recurrence(cu, reverse):
    torch.manual_seed(1)
    b = 1 if cu else 2
    inp = make_inputs(b, 37, 2, 3, 4, nstates=len(cu) - 1 if cu else None, seed=11)
    y1, S1 = oracle(inp, cu, reverse)
    y2, S2 = oracle_loop(inp, cu, reverse)
    assert rel_err(y1, y2) < 1e-12 and rel_err(S1, S2) < 1e-12


# --------------------------------------------------------------------------------------------
# impl="torch" vs the oracle (float64 inputs -> the torch path computes in float64)
# --------------------------------------------------------------------------------------------

# Float64 inputs are computed in float64 by the torch path, so the only differences from the
# oracle are summation order and exp/cumsum rounding (measured <= 1e-13 relative to scale).
TOL64 = 1e-11

SMALL_CASES = [
    (l, cs, s0, d, rev)
    for l in (1, 63, 100)
    for cs in (64, 16)
    for s0 in (False, True)
    for d in (False, True)
    for rev in (False, True)
]


@pytest.mark.parametrize("l,chunk,s0,d,reverse", SMALL_CASES)
def test_scan_f64_vs_oracle(l, chunk, s0, d, reverse):
    torch.manual_seed(l * 7 + chunk)
    inp = make_inputs(2, l, 3, 5, 4, s0=s0, d=d, seed=l + chunk + 2 * s0 + 4 * d + 8 * reverse)
    check_against_oracle(leaves(inp), leaves(inp), TOL64, reverse=reverse, chunk_size=chunk, impl="torch")


@pytest.mark.parametrize("chunk,s0,d,reverse", [(64, True, True, False), (16, True, False, True), (64, False, True, True), (16, False, False, False)])
def test_scan_f64_vs_oracle_long(chunk, s0, d, reverse):
    # 2000 tokens: 32 chunks of 64 (two groups in the inter-chunk recurrence) or 125 chunks of 16.
    torch.manual_seed(2000 + chunk)
    inp = make_inputs(1, 2000, 2, 4, 4, s0=s0, d=d, seed=chunk + 2 * s0 + 4 * d + 8 * reverse)
    check_against_oracle(leaves(inp), leaves(inp), TOL64, reverse=reverse, chunk_size=chunk, impl="torch")


CU_CASES = [
    [0, 7, 70, 71, 130],  # odd segment lengths, a length-1 segment
    [0, 5, 5, 12],  # an empty segment: its final state is its initial state
    [0, 130],  # a single segment
]


@pytest.mark.parametrize("cu", CU_CASES, ids=["odd", "empty", "single"])
@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("s0", [False, True])
def test_scan_f64_cu_seqlens(cu, chunk, reverse, s0):
    torch.manual_seed(len(cu) + chunk)
    inp = make_inputs(1, cu[-1], 3, 5, 4, s0=s0, nstates=len(cu) - 1, seed=cu[-1] + chunk + reverse + 2 * s0)
    check_against_oracle(leaves(inp), leaves(inp), TOL64, cu=cu, reverse=reverse, chunk_size=chunk, impl="torch")


@pytest.mark.parametrize("chunk,reverse,s0", [(16, True, True), (64, False, False)])
def test_scan_f64_cu_seqlens_long(chunk, reverse, s0):
    # 2000 packed tokens in segments of 3, 997 and 1000 (several chunk groups per segment).
    cu = [0, 3, 1000, 2000]
    torch.manual_seed(chunk)
    inp = make_inputs(1, cu[-1], 2, 3, 4, s0=s0, nstates=len(cu) - 1, seed=chunk + reverse)
    check_against_oracle(leaves(inp), leaves(inp), TOL64, cu=cu, reverse=reverse, chunk_size=chunk, impl="torch")


def test_chunk_size_one_and_odd():
    # chunk_size 1 (every step its own chunk: 63 chunks -> 4 groups) and a non-power-of-two chunk.
    torch.manual_seed(3)
    inp = make_inputs(2, 63, 2, 3, 2, seed=3)
    for chunk in (1, 7):
        for rev in (False, True):
            check_against_oracle(leaves(inp), leaves(inp), TOL64, reverse=rev, chunk_size=chunk, impl="torch")


def test_split_sequence_state_passing():
    # Scanning [0, k) then [k, L) from the carried state equals one scan over [0, L).
    torch.manual_seed(4)
    inp = make_inputs(1, 3000, 2, 4, 4, seed=4)
    x, dt, A, B, C, D, S0 = (inp[k] for k in KEYS)
    y, S = ssd_scan(x, dt, A, B, C, D, initial_state=S0, return_final_state=True, impl="torch")
    k = 1234
    y1, S1 = ssd_scan(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], D, initial_state=S0, return_final_state=True)
    y2, S2 = ssd_scan(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], D, initial_state=S1, return_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), y) < TOL64 and rel_err(S2, S) < TOL64


# --------------------------------------------------------------------------------------------
# float32 and low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,reverse,cu", [(64, False, None), (16, True, None), (16, False, [0, 7, 70, 71, 300]), (64, True, [0, 7, 70, 71, 300])])
def test_scan_f32_vs_oracle(chunk, reverse, cu):
    # float32 math: each output is a sum of ~100 significant terms of size <= scale, rounded at
    # ~6e-8 relative; exp/cumsum of log-decays of size <= 10 add ~1e-6 relative. 2e-5 relative to
    # the output's scale leaves a margin (measured about 1e-6).
    torch.manual_seed(32)
    b = 1 if cu else 2
    inp = make_inputs(b, 300, 3, 8, 6, nstates=len(cu) - 1 if cu else None, seed=32 + chunk)
    ref = leaves(inp)
    errs = check_against_oracle(ref, leaves(inp, torch.float32), 2e-5, cu=cu, reverse=reverse, chunk_size=chunk, impl="torch")
    assert errs["y"] < 2e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_low_precision(dtype, tol, reverse):
    # x, dt, B, C in bf16/fp16 (A, D, S0 in float32). The oracle runs on exactly those rounded
    # values, so the only error is float32 math plus ONE rounding of each output to x's dtype
    # (y) or of each gradient to its input's dtype: at most 2^-8 (bf16) / 2^-11 (fp16) of the
    # value, i.e. <= 0.4% / 0.05% of the scale. Tolerances: about 4x that.
    torch.manual_seed(16)
    inp = make_inputs(2, 150, 3, 8, 8, seed=16 + reverse)
    test = leaves(inp, lowp=dtype)
    ref = {k: (None if v is None else v.detach().double().requires_grad_(True)) for k, v in test.items()}
    errs = check_against_oracle(ref, test, tol, reverse=reverse, chunk_size=32, impl="torch")
    y, S = run_scan(test, impl="torch")
    assert y.dtype == dtype and S.dtype == torch.float32
    assert errs["y"] > 0  # really rounded


# --------------------------------------------------------------------------------------------
# ssd_step
# --------------------------------------------------------------------------------------------


def step_loop(inp, reverse=False):
    x, dt, A, B, C, D, S0 = (inp[k] for k in KEYS)
    b, l, h, p = x.shape
    S = S0 if S0 is not None else x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32)
    ys = [None] * l
    for t in (range(l - 1, -1, -1) if reverse else range(l)):
        ys[t], S = ssd_step(S, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("s0", [False, True])
def test_step_loop_matches_scan(dtype, tol, reverse, s0):
    torch.manual_seed(5)
    inp = {k: (None if v is None else v.to(dtype)) for k, v in make_inputs(2, 50, 3, 4, 5, s0=s0, seed=5 + reverse).items()}
    y_loop, S_loop = step_loop(inp, reverse)
    y, S = run_scan(inp, reverse=reverse, chunk_size=16, impl="torch")
    assert y_loop.dtype == dtype and S_loop.dtype == dtype
    assert rel_err(y_loop, y) < tol and rel_err(S_loop, S) < tol


def test_step_out_of_place_dtypes_and_grad():
    torch.manual_seed(6)
    b, h, p, n = 2, 3, 4, 5
    state = torch.randn(b, h, p, n)
    before = state.clone()
    x = torch.randn(b, h, p, dtype=torch.bfloat16, requires_grad=True)
    dt = torch.rand(b, h, requires_grad=True)
    A = -torch.rand(h)
    B, C = torch.randn(b, h, n), torch.randn(b, h, n)
    y, new = ssd_step(state, x, dt, A, B, C, torch.ones(h))
    assert torch.equal(state, before)  # input state untouched
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32 and new.shape == state.shape
    (y.float().sum() + new.sum()).backward()
    assert x.grad is not None and dt.grad is not None
    # matches the formula directly
    ref = state * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    torch.testing.assert_close(new, ref)
    with pytest.raises(ValueError, match="ssd_step"):
        ssd_step(state, x, dt[:, :1], A, B, C)


# --------------------------------------------------------------------------------------------
# transformers' pure-torch Mamba2 reference
# --------------------------------------------------------------------------------------------


def _hf():
    try:
        from transformers.models.mamba2 import modeling_mamba2 as m
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"transformers Mamba2 not importable: {exc}")
    if not hasattr(m, "mamba2_chunk_scan") or not hasattr(m, "mamba2_selective_state_update"):
        pytest.skip("this transformers version has no mamba2_chunk_scan / mamba2_selective_state_update")
    return m


@pytest.mark.parametrize("l,hf_chunk,our_chunk", [(100, 64, 64), (257, 32, 16), (1, 64, 64)])
def test_vs_transformers_mamba2_chunk_scan(l, hf_chunk, our_chunk):
    # transformers' mamba2_chunk_scan (ssd_minimal-style torch fallback of mamba_chunk_scan_combined,
    # float32 math). Mamba2 groups: B, C with ngroups=1 for HF, expanded to heads for us.
    m = _hf()
    torch.manual_seed(7)
    b, h, p, n = 2, 4, 8, 6
    inp = make_inputs(b, l, h, p, 1, seed=7)
    x, dt, A, D = (inp[k].float() for k in ("x", "dt", "A", "D"))
    Bg = torch.randn(b, l, 1, n) / math.sqrt(n)
    Cg = torch.randn(b, l, 1, n)
    S0 = torch.randn(b, h, p, n)
    y_hf, S_hf = m.mamba2_chunk_scan(x, dt, A, Bg, Cg, hf_chunk, D=D, initial_states=S0, return_final_states=True)
    y, S = ssd_scan(x, dt, A, Bg.expand(b, l, h, n), Cg.expand(b, l, h, n), D, initial_state=S0,
                    return_final_state=True, chunk_size=our_chunk, impl="torch")
    assert rel_err(y, y_hf) < 1e-5 and rel_err(S, S_hf) < 1e-5
    # also with softplus(dt_raw + dt_bias) done outside, as Mamba2Mixer does
    dt_raw, dt_bias = torch.randn(b, l, h), torch.randn(h)
    y_hf = m.mamba2_chunk_scan(x, dt_raw, A, Bg, Cg, hf_chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    y = ssd_scan(x, F.softplus(dt_raw + dt_bias), A, Bg.expand(b, l, h, n), Cg.expand(b, l, h, n), D, impl="torch")
    assert rel_err(y, y_hf) < 1e-5


def test_vs_transformers_selective_state_update():
    m = _hf()
    torch.manual_seed(8)
    b, h, p, n = 2, 4, 8, 6
    state = torch.randn(b, h, p, n)
    x, dt, A, D = torch.randn(b, h, p), torch.rand(b, h), -torch.rand(h) - 0.1, torch.randn(h)
    Bg, Cg = torch.randn(b, 1, n), torch.randn(b, 1, n)
    hf_state = state.clone()
    # HF's torch path wants dt per channel and A per (head, channel, state), as Mamba2Mixer passes them.
    y_hf = m.mamba2_selective_state_update(hf_state, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), Bg, Cg, D=D[:, None].expand(h, p))
    y, new = ssd_step(state, x, dt, A, Bg.expand(b, h, n), Cg.expand(b, h, n), D)
    assert rel_err(y, y_hf) < 1e-6 and rel_err(new, hf_state) < 1e-6


# --------------------------------------------------------------------------------------------
# Dispatch and errors
# --------------------------------------------------------------------------------------------


def test_auto_on_cpu_is_torch():
    torch.manual_seed(9)
    inp = leaves(make_inputs(1, 20, 2, 3, 4, seed=9), torch.float32)
    ya, Sa = run_scan(inp, impl="auto")
    yt, St = run_scan(inp, impl="torch")
    assert torch.equal(ya, yt) and torch.equal(Sa, St)
    y_only = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert isinstance(y_only, torch.Tensor) and y_only.shape == inp["x"].shape


def test_empty_sequence_passes_state_through():
    S0 = torch.randn(1, 2, 3, 4)
    z = torch.zeros(1, 0, 2, 3)
    zb = torch.zeros(1, 0, 2, 4)
    for rev in (False, True):
        y, S = ssd_scan(z, torch.zeros(1, 0, 2), -torch.ones(2), zb, zb, torch.ones(2),
                        initial_state=S0, return_final_state=True, reverse=rev, impl="torch")
        assert y.shape == z.shape and torch.equal(S, S0)


def test_errors():
    torch.manual_seed(10)
    inp = make_inputs(2, 10, 2, 3, 4, s0=False, d=False, seed=10)
    x, dt, A, B, C = (inp[k].float() for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(RuntimeError, match=r"impl='fla'.*(CUDA|fla-core)"):
        ssd_scan(x, dt, A, B, C, impl="fla")
    with pytest.raises(ValueError, match="valid values are 'auto', 'torch', 'fla'"):
        ssd_scan(x, dt, A, B, C, impl="triton")
    with pytest.raises(ValueError, match="batch size 1"):
        ssd_scan(x, dt, A, B, C, cu_seqlens=torch.tensor([0, 4, 10]))
    x1, dt1, B1, C1 = x[:1], dt[:1], B[:1], C[:1]
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_scan(x1, dt1, A, B1, C1, cu_seqlens=torch.tensor([1, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_scan(x1, dt1, A, B1, C1, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state"):
        ssd_scan(x1, dt1, A, B1, C1, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan(x, dt[:, :5], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        ssd_scan(x, dt, A, B[:1], C)
    with pytest.raises(ValueError, match="A must be"):
        ssd_scan(x, dt, A[:1], B, C)
    with pytest.raises(ValueError, match="C must"):
        ssd_scan(x, dt, A, B, C[..., :2])


# --------------------------------------------------------------------------------------------
# GPU: impl="fla" vs impl="torch" in bf16 (skips without CUDA; run with `pytest -m gpu`)
# --------------------------------------------------------------------------------------------

GPU_MODES = ["plain", "initial_state", "reverse", "cu_seqlens", "cu_seqlens_reverse"]
# atol of the GPU comparison, as a fraction of each tensor's max |oracle|.
GPU_ATOL = 1e-2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _compare_fla_torch(pairs, what):
    """Rule: max|fla - ref| <= 2 max|torch - ref| + GPU_ATOL * max|ref|, per tensor."""
    report, bad = {}, {}
    for name, (f, t, r) in pairs.items():
        scale = max(r.abs().max().item(), 1e-30)
        err_f = (f.double() - r).abs().max().item()
        err_t = (t.double() - r).abs().max().item()
        report[name] = f"fla {err_f / scale:.1e} torch {err_t / scale:.1e}"
        if not err_f <= 2 * err_t + GPU_ATOL * scale:
            bad[name] = report[name]
    print(f"{what}: max errors relative to scale:", report)
    assert not bad, f"{what}: fla worse than 2x torch + {GPU_ATOL}*scale: {bad}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", GPU_MODES)
@pytest.mark.parametrize("l", [1, 100, 2000])
def test_fla_vs_torch_bf16(l, mode):
    """|fla - oracle64| <= 2 |torch_bf16 - oracle64| + atol (max-abs), forward and all gradients.

    Both impls get the same bf16 x, dt, B, C (A, D, S0 float32); the float64 oracle runs on
    exactly those values. The torch path computes in float32 and rounds once; fla also feeds
    bf16 operands to its tensor-core dots, hence the extra atol (a fraction of the scale).
    """
    pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install linmu[gpu])")
    from linmu.ops.ssd import _fla_backward_blocked

    dev = "cuda"
    torch.manual_seed(l)
    cu = None
    if mode.startswith("cu_seqlens"):
        cu = sorted({0, l, *[c for c in (7, 70, 71, 1000) if c < l]})
    b = 1 if cu else 2
    inp = make_inputs(b, l, 4, 64, 64, s0=mode != "plain", nstates=len(cu) - 1 if cu else None, seed=l + len(mode), device=dev)
    reverse = mode.endswith("reverse")
    test_f = leaves(inp, lowp=torch.bfloat16)
    test_t = leaves(inp, lowp=torch.bfloat16)
    ref = {k: (None if v is None else v.detach().double().requires_grad_(True)) for k, v in test_f.items()}

    y_ref, S_ref = oracle(ref, cu, reverse)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.long, device=dev)
    y_f, S_f = run_scan(test_f, cu_seqlens=cu_t, reverse=reverse, impl="fla")
    y_t, S_t = run_scan(test_t, cu_seqlens=cu_t, reverse=reverse, impl="torch")
    assert y_f.dtype == torch.bfloat16 and S_f.dtype == torch.float32 and S_f.shape == S_ref.shape
    _compare_fla_torch({"y": (y_f, y_t, y_ref), "S": (S_f, S_t, S_ref)}, f"l={l} {mode} forward")

    blocked = _fla_backward_blocked()
    if blocked:
        pytest.skip(f"forward checked; backward not run: {blocked}")
    gy, gS = torch.randn_like(y_ref), torch.randn_like(S_ref)
    g_ref = grads_of(y_ref, S_ref, ref, gy, gS)
    g_f = grads_of(y_f, S_f, test_f, gy, gS)
    g_t = grads_of(y_t, S_t, test_t, gy, gS)
    _compare_fla_torch({"d" + k: (g_f[k], g_t[k], g_ref[k]) for k in g_ref}, f"l={l} {mode} backward")


@pytest.mark.gpu
@needs_cuda
def test_auto_dispatch_gpu():
    pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install linmu[gpu])")
    from linmu.ops.ssd import _fla_backward_blocked

    inp = leaves(make_inputs(1, 300, 2, 64, 64, seed=1, device="cuda"), lowp=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(run_scan(inp, impl="auto")[0], run_scan(inp, impl="fla")[0])
        # float64 is not an fla dtype: auto takes torch
        inp64 = {k: (None if v is None else v.double()) for k, v in inp.items()}
        assert torch.equal(run_scan(inp64, impl="auto")[0], run_scan(inp64, impl="torch")[0])
    if _fla_backward_blocked():
        # differentiable call: auto falls back to torch with a warning instead of failing in backward
        with pytest.warns(RuntimeWarning, match="using impl='torch'"):
            y = run_scan(inp, impl="auto")[0]
        assert torch.equal(y, run_scan(inp, impl="torch")[0])


if __name__ == "__main__":  # standalone GPU run: python tests/ops/test_ssd.py
    sys.exit(pytest.main([__file__, "-m", "gpu", "-v", "-s", *sys.argv[1:]]))
