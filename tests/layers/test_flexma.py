import itertools

import pytest
import torch
import torch.nn.functional as F

from linmu.config import MMateConfig
from linmu.layers.flexma import FlexMA
from tests.helpers import extend_with_text, mixed_layout, span_end_of

ORDERS = {0: "THW", 1: "TWH", 2: "HWT", 3: "WHT"}


def make_flexma(layer_idx=0, dtype=torch.float64, init="mamba2", heads=(4, 2), P=8, hidden=32, **cfg):
    torch.manual_seed(1234 + layer_idx)
    config = MMateConfig(init=init, ssd_impl="torch", chunk_size=8, **cfg)
    m = FlexMA(hidden, heads[0], heads[1], P, layer_idx, config, dtype=dtype)
    with torch.no_grad():
        # make every new parameter non-trivial so that no dependency hides behind a zero
        for name, p in m.named_parameters():
            if name.startswith(("conv_", "dt_proj", "z_proj")):
                p.add_(0.3 * torch.randn_like(p))
            if name.startswith("D_"):
                p.normal_()
    return m


def naive_flexma(m: FlexMA, u: torch.Tensor, layout) -> torch.Tensor:
    """Flex-MA of batch row 0 written from LINMU.md §3.1 with explicit loops, in float64."""
    cfg, L = m.config, u.shape[1]
    H, G, P, K = m.num_heads, m.num_kv_heads, m.head_dim, cfg.d_conv
    u = u[0].double()
    # scan order: inside each span, tokens sorted by the layer's axis order
    seq = list(range(L))
    for s in layout.spans:
        if s.batch:
            continue
        T, Hh, W = s.grid
        name = ORDERS[m.layer_idx % 4] if T > 1 else ORDERS[m.layer_idx % 2]
        if not cfg.rotary_major_scan:
            name = "THW"
        sizes = dict(T=T, H=Hh, W=W)
        order = []
        for c in itertools.product(*[range(sizes[a]) for a in name]):
            d = dict(zip(name, c))
            order.append(s.start + d["T"] * Hh * W + d["H"] * W + d["W"])
        seq[s.start:s.start + s.length] = order
    us = u[seq]
    W_ = lambda lin: lin.weight.double()
    b_ = lambda lin: lin.bias.double() if lin.bias is not None else 0
    raw = torch.cat([us @ W_(m.v_proj).T + b_(m.v_proj), us @ W_(m.k_proj).T + b_(m.k_proj),
                     us @ W_(m.q_proj).T + b_(m.q_proj)], -1)

    def split(v):
        x, b, c = v[: G * P], v[G * P: 2 * G * P], v[2 * G * P:]
        rep = H // G
        x = x.view(G, P).repeat_interleave(rep, 0)
        b = b.view(G, P).repeat_interleave(rep, 0)
        return x, b, c.view(H, P)

    dt_raw = us @ W_(m.dt_proj).T
    y = torch.zeros(L, H, P, dtype=torch.float64)
    # forward recurrence over the whole (scan-ordered) sequence
    wf, bf = m.conv_fwd.double(), m.conv_fwd_bias.double()
    A = -torch.exp(m.A_log_fwd.double())
    S = torch.zeros(H, P, P, dtype=torch.float64)
    for k in range(L):
        conv = bf + sum(wf[:, K - 1 - j] * raw[k - j] for j in range(K) if k - j >= 0)
        x, b, c = split(F.silu(conv))
        dt = F.softplus(dt_raw[k] + m.dt_bias_fwd.double())
        for h in range(H):
            S[h] = torch.exp(dt[h] * A[h]) * S[h] + dt[h] * torch.outer(x[h], b[h])
            y[k, h] = S[h] @ c[h] + m.D_fwd.double()[h] * x[h]
    # backward recurrence inside each span, excluding the token itself, plus D_bwd * x
    if cfg.bidirectional:
        wb, bb = m.conv_bwd.double(), m.conv_bwd_bias.double()
        Ab = -torch.exp(m.A_log_bwd.double())
        for s in layout.spans:
            if s.batch:
                continue
            a, e = s.start, s.start + s.length
            S = torch.zeros(H, P, P, dtype=torch.float64)
            for k in range(e - 1, a - 1, -1):
                conv = bb + sum(wb[:, K - 1 - j] * raw[k + j] for j in range(K) if k + j < e)
                x, b, c = split(F.silu(conv))
                dt = F.softplus(dt_raw[k] + m.dt_bias_bwd.double())
                for h in range(H):
                    S_prev = S[h].clone()
                    S[h] = torch.exp(dt[h] * Ab[h]) * S[h] + dt[h] * torch.outer(x[h], b[h])
                    y[k, h] += torch.exp(dt[h] * Ab[h]) * (S_prev @ c[h]) + m.D_bwd.double()[h] * x[h]
    z = (us @ W_(m.z_proj).T + b_(m.z_proj)).view(L, H, P)
    g = y * F.silu(z)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    out = g.reshape(L, H * P) * m.norm_weight.double()
    core = torch.empty_like(out)
    core[seq] = out
    return core[None]


@pytest.mark.parametrize("layer_idx", [0, 1, 2, 3])
@pytest.mark.parametrize("rms", [True, False])
def test_flexma_matches_loop_reference(layer_idx, rms):
    m = make_flexma(layer_idx, dtype=torch.float32, rotary_major_scan=rms)
    layout, L = mixed_layout()
    u = torch.randn(1, L, 32)
    got = m(u, layout)
    ref = naive_flexma(m, u, layout)
    # the module accumulates the scans in float32: agreement at float32 rounding of O(1) outputs
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


def test_flexma_gqa_and_mimic_init_match_reference():
    m = make_flexma(2, dtype=torch.float32, init="mimic", heads=(6, 3))
    layout, L = mixed_layout()
    u = torch.randn(1, L, 32)
    torch.testing.assert_close(m(u, layout).double(), naive_flexma(m, u, layout), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_idx", [0, 1, 2, 3])
def test_dependency_contract_by_perturbation(layer_idx):
    """Text output depends only on tokens at or before it; a visual token on everything before its span's end."""
    m = make_flexma(layer_idx)
    layout, L = mixed_layout()
    u = torch.randn(1, L, 32, dtype=torch.float64)
    base = m(u, layout)
    for j in range(L):
        u2 = u.clone()
        u2[0, j] += torch.randn(32, dtype=torch.float64)
        moved = (m(u2, layout) - base).abs().amax(-1)[0]
        for i in range(L):
            end = span_end_of(layout, 0, i)
            should = j < end if end is not None else j <= i
            if should:
                assert moved[i] > 1e-9, (i, j)
            else:
                assert moved[i] == 0, (i, j, moved[i].item())


@pytest.mark.parametrize("init", ["mimic", "mamba2"])
def test_prefill_then_step_equals_full_forward(init):
    m = make_flexma(1, dtype=torch.float32, init=init)
    layout, L = mixed_layout(batch_size=2)
    n = 7
    u = torch.randn(2, L + n, 32)
    full = m(u, extend_with_text(layout, n))
    core, state = m(u[:, :L], layout, return_state=True)
    torch.testing.assert_close(core, full[:, :L], atol=1e-5, rtol=1e-5)
    for t in range(n):
        out, state = m.step(u[:, L + t:L + t + 1], state)
        torch.testing.assert_close(out, full[:, L + t:L + t + 1], atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded_row():
    from linmu.layout import TokenLayout, VisualSpan

    m = make_flexma(3, dtype=torch.float32)
    pad = 5
    layout, L = mixed_layout()
    u = torch.randn(1, L, 32)
    ref = m(u, layout)
    key_valid = torch.ones(1, L + pad, dtype=torch.bool)
    key_valid[0, :pad] = False
    spans = [VisualSpan(0, s.start + pad, s.grid, s.kind) for s in layout.spans]
    padded = TokenLayout.from_spans(1, L + pad, spans, key_valid=key_valid)
    up = torch.cat([torch.randn(1, pad, 32), u], 1)
    got = m(up, padded)[:, pad:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
