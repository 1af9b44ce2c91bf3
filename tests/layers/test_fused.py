"""The fused M-MATE prefill against the reference path.

CPU: the whole fused path (``MMate.fused = "always"``) runs on the kernels' PyTorch references and the torch SSD;
it must equal the reference path in float32 to rounding (1e-5: both are float32 end to end, only the order of
additions differs). GPU (``gpu`` marker): the Triton kernels against their PyTorch references, and the fused bf16
block (fla scans, Triton kernels, flash windows) against the reference path, each measured against a float32
computation of the same block.
"""

from __future__ import annotations

import pytest
import torch

from linmu.config import MMateConfig
from linmu.layers import fused as fk
from linmu.layers.mmate import MMate
from linmu.layout import TokenLayout, VisualSpan
from tests.helpers import llama_config, random_rope


def _attention(hidden=48, heads=6, kv_heads=2, seed=0):
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(seed)
    cfg = llama_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads)
    return LlamaAttention(cfg, layer_idx=0).eval()


def _layout(device="cpu"):
    """Two rows: images and videos with grids that do not divide the windows, text between, left padding."""
    B, L = 2, 44
    spans = [VisualSpan(0, 3, (1, 2, 3), "image"), VisualSpan(0, 11, (3, 2, 3), "video"),
             VisualSpan(1, 4, (2, 3, 4), "video"), VisualSpan(1, 30, (1, 2, 2), "image")]
    kv = torch.ones(B, L, dtype=torch.bool)
    kv[1, :3] = False
    return TokenLayout.from_spans(B, L, spans, key_valid=kv, device=device), B, L


def _randomise(block: MMate, seed: int):
    """Non-trivial values for every parameter the teacher does not have (fusion weights, conv, dt, A, D, norm)."""
    g = torch.Generator().manual_seed(seed)
    new = ("conv_", "dt_bias", "A_log", "D_", "dt_proj", "z_proj", "norm_weight", "w_flex", "w_swin", "gate")
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not any(name.split(".")[-1].startswith(t) or f".{t}" in f".{name}" for t in new):
                continue
            positive = name.startswith("w_") or "norm_weight" in name
            v = torch.rand(p.shape, generator=g) * 0.8 + 0.2 if positive else torch.randn(p.shape, generator=g) * 0.3
            if name.endswith("_proj.weight"):  # z and dt of order 0.3, like the rest: a well-conditioned gated norm
                v = v / p.shape[1] ** 0.5
            p.copy_(v.to(p.dtype))


CASES = [
    # layer, fusion, fuse_gemms, n_sink, bidirectional, use_flex, use_swin
    (0, "head", True, 0, True, True, True),
    (1, "head", False, 0, True, True, True),
    (2, "channel", True, 2, True, True, True),
    (3, "channel", False, 0, True, True, True),
    (1, "head", True, 0, False, True, True),
    (2, "head", True, 0, True, True, False),
    (3, "head", True, 3, True, False, True),
    (1, "gate", True, 0, True, True, True),
    (2, "gate", False, 2, True, True, True),
    (0, "gate", True, 0, True, False, True),
]


@pytest.mark.parametrize("layer,fusion,fuse_gemms,n_sink,bidirectional,use_flex,use_swin", CASES)
def test_fused_prefill_equals_reference_cpu(layer, fusion, fuse_gemms, n_sink, bidirectional, use_flex, use_swin):
    layout, B, L = _layout()
    attn = _attention()
    cfg = MMateConfig(window=(2, 2, 2), text_window=5, n_sink=n_sink, chunk_size=8, fusion=fusion,
                      bidirectional=bidirectional, use_flex=use_flex, use_swin=use_swin)
    block = MMate.from_attention(attn, layer, cfg)
    _randomise(block, seed=layer)
    block.fuse_gemms = fuse_gemms
    x = torch.randn(B, L, 48)
    pe = random_rope(B, L, 8)
    with torch.no_grad():
        block.fused = "never"
        ref, _ = block(x, position_embeddings=pe, linmu_layout=layout)
        ref_p, ref_state = block.prefill(x, layout, pe)
        block.fused = "always"
        assert block._use_fused(x)
        out, _ = block(x, position_embeddings=pe, linmu_layout=layout)
        out_p, state = block.prefill(x, layout, pe)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_p, ref_p, atol=1e-5, rtol=0)
    if use_flex:
        torch.testing.assert_close(state.flex.ssm, ref_state.flex.ssm, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.flex.conv, ref_state.flex.conv, atol=0, rtol=0)
    if use_swin:
        for name in ("k", "v", "valid", "pos"):
            torch.testing.assert_close(getattr(state.swin, name), getattr(ref_state.swin, name), atol=1e-6, rtol=0)


def test_fused_prefill_then_step_equals_full_forward_cpu():
    """The fused prefill's decode state continues exactly like the reference one (same steps after it)."""
    from tests.helpers import extend_with_text

    layout, B, L = _layout()
    attn = _attention()
    block = MMate.from_attention(attn, 1, MMateConfig(window=(2, 2, 2), text_window=6, n_sink=2, chunk_size=8))
    _randomise(block, seed=5)
    n = 4
    x = torch.randn(B, L + n, 48)
    pe = random_rope(B, L + n, 8)
    with torch.no_grad():
        block.fused = "never"
        full, _ = block(x, position_embeddings=pe, linmu_layout=extend_with_text(layout, n))
        block.fused = "always"
        _, state = block.prefill(x[:, :L], layout, (pe[0][:, :L], pe[1][:, :L]))
        for t in range(n):
            s = slice(L + t, L + t + 1)
            out, state = block.step(x[:, s], state, (pe[0][:, s], pe[1][:, s]))
            torch.testing.assert_close(out, full[:, s], atol=1e-5, rtol=1e-5)


def test_fused_path_is_not_taken_for_training_or_unsupported_settings():
    layout, B, L = _layout()
    block = MMate.from_attention(_attention(), 0, MMateConfig(window=(2, 2, 2)))
    x = torch.randn(B, L, 48)
    block.fused = "always"
    assert not block._use_fused(x)  # parameters require grad and grad mode is on: the reference path trains
    with torch.no_grad():
        assert block._use_fused(x)
        block.config.attn_impl = "reference"
        assert not block._use_fused(x)
        block.config.attn_impl = MMateConfig().attn_impl
        block.fused = "auto"
        assert not block._use_fused(x)  # CPU: auto keeps the reference path
        block.fused = "sometimes"
        with pytest.raises(ValueError, match="fused"):
            block._use_fused(x)


def test_auto_falls_back_to_the_reference_path_once_when_the_fused_kernels_fail(monkeypatch):
    import linmu.layers.mmate as mm

    layout, B, L = _layout()
    block = MMate.from_attention(_attention(), 0, MMateConfig(window=(2, 2, 2), chunk_size=8))
    x = torch.randn(B, L, 48)
    pe = random_rope(B, L, 8)
    with torch.no_grad():
        block.fused = "never"
        ref, _ = block(x, position_embeddings=pe, linmu_layout=layout)

        def broken(*args):
            raise RuntimeError("no kernel for this GPU")

        monkeypatch.setattr(block, "_fused_forward", broken)
        monkeypatch.setattr(mm, "_FUSED_FAILED", None)
        block.fused = "always"
        with pytest.raises(RuntimeError, match="no kernel"):
            block(x, position_embeddings=pe, linmu_layout=layout)
        block.fused = "auto"
        monkeypatch.setattr(block, "_use_fused", lambda u: True)
        with pytest.warns(RuntimeWarning, match="no kernel for this GPU"):
            out, _ = block(x, position_embeddings=pe, linmu_layout=layout)
        assert mm._FUSED_FAILED is not None
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


def _gpu_ready():
    pytest.importorskip("triton", reason="Triton not installed")
    pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install linmu[gpu])")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_torch_references(dtype):
    _gpu_ready()
    dev = "cuda"
    torch.manual_seed(0)
    G, P, REP, K = 2, 64, 3, 4
    H = G * REP
    C = 2 * G * P + H * P
    N = 1000
    proj = torch.randn(N, C + 40, device=dev, dtype=dtype)
    raw = proj[:, 8:8 + C]  # strided rows, offset columns, as the fused GEMM output
    src = torch.randperm(N, device=dev)
    segpos = torch.arange(N, device=dev) % 97
    w = (torch.randn(C, K, device=dev) * 0.5).to(dtype)
    b = (torch.randn(C, device=dev) * 0.1).to(dtype)
    valid = torch.rand(N, device=dev) > 0.1
    dt = torch.rand(N, H, device=dev)
    # Both round once to the output dtype from float32 math: they agree to one output rounding (plus float32
    # reassociation), i.e. 2 bf16 ulps of the largest values, or 1e-5 in float32.
    def close(a, t, name):
        if a is None:
            assert t is None
            return
        scale = a.float().abs().max().item()
        tol = 1e-5 * max(scale, 1) if dtype == torch.float32 else 2 * 2**-8 * scale
        err = (a.float() - t.float()).abs().max().item()
        assert err <= tol, (name, err, tol)

    for want_diag in (False, True):
        for vv in (None, valid):
            ref = fk.conv_scan_inputs(raw, src, segpos, w, b, vv, dt, G, P, want_diag, impl="torch")
            got = fk.conv_scan_inputs(raw, src, segpos, w, b, vv, dt, G, P, want_diag, impl="triton")
            for name, a, t in zip(("q", "k", "v", "x", "diag"), ref, got):
                close(a, t, name)

    Rb = 600
    o_f, x_f = torch.randn(N, H, P, device=dev, dtype=dtype), torch.randn(N, G, P, device=dev, dtype=dtype)
    o_b, x_b = torch.randn(Rb, H, P, device=dev, dtype=dtype), torch.randn(Rb, G, P, device=dev, dtype=dtype)
    diag = torch.randn(Rb, H, device=dev)
    fwd_row = torch.randperm(N, device=dev)
    bwd_row = torch.full((N,), -1, device=dev)
    bwd_row[torch.randperm(N, device=dev)[:Rb]] = torch.randperm(Rb, device=dev)
    z = torch.randn(N, H * P + 16, device=dev, dtype=dtype)[:, 16:]
    Df, Db = torch.randn(H, device=dev, dtype=dtype), torch.randn(H, device=dev, dtype=dtype)
    nw = torch.rand(H * P, device=dev, dtype=dtype) + 0.5
    for bwd in ((None,) * 5, (o_b, x_b, diag, Db, bwd_row)):
        outs = []
        for impl in ("torch", "triton"):
            buf = torch.full((N, 2 * H * P), float("nan"), device=dev, dtype=dtype)
            fk.combine_gated_norm(buf[:, H * P:], z, o_f, x_f, Df, fwd_row, *bwd, nw, 1e-6, impl=impl)
            assert torch.isnan(buf[:, :H * P]).all()  # nothing written outside the destination columns
            outs.append(buf[:, H * P:])
        assert torch.isfinite(outs[1]).all()
        close(outs[0], outs[1], "combine")

    x = torch.randn(N, 5, 2 * P, device=dev, dtype=dtype)[:, 1:, :P]  # head and row strides
    cos, sin = torch.randn(N, P, device=dev, dtype=dtype), torch.randn(N, P, device=dev, dtype=dtype)
    for rope in (True, False):
        cs = (cos, sin) if rope else (None, None)
        close(fk.rope_gather(x, src, *cs, impl="torch"), fk.rope_gather(x, src, *cs, impl="triton"), "rope")


@pytest.mark.gpu
@pytest.mark.parametrize("layer,fusion", [(0, "head"), (1, "head"), (2, "head"), (3, "head"), (1, "gate"),
                                          (2, "channel")])
def test_fused_block_bf16_matches_reference_gpu(layer, fusion):
    """Fused bf16 vs reference bf16, both against the block in float32 (torch scans): the fused error must stay
    within twice the reference path's own bf16 error (+ 2e-3 of the output scale)."""
    _gpu_ready()
    dev = "cuda"
    hidden, heads, kv_heads, P = 256, 4, 2, 64
    attn = _attention(hidden, heads, kv_heads, seed=layer).to(dev)
    B, L = 2, 1200
    spans = [VisualSpan(0, 5, (6, 8, 10), "video"), VisualSpan(0, 700, (1, 12, 9), "image"),
             VisualSpan(1, 20, (9, 7, 11), "video")]
    kv = torch.ones(B, L, dtype=torch.bool)
    kv[1, :7] = False
    layout = TokenLayout.from_spans(B, L, spans, key_valid=kv, device=dev)
    cfg = MMateConfig(window=(2, 4, 4), text_window=64, chunk_size=64, init="mamba2", fusion=fusion)
    block32 = MMate.from_attention(attn, layer, cfg)
    _randomise(block32, seed=layer)
    block32.config = MMateConfig(**{**cfg.to_dict(), "ssd_impl": "torch"})
    block32.flex.config = block32.swin.config = block32.config
    x = torch.randn(B, L, hidden, device=dev)
    pe = random_rope(B, L, P)
    pe = (pe[0].to(dev), pe[1].to(dev))
    import copy

    block16 = copy.deepcopy(block32).to(torch.bfloat16)
    for m in (block16, block16.flex, block16.swin):
        m.config = cfg
    x16, pe16 = x.bfloat16(), (pe[0].bfloat16(), pe[1].bfloat16())
    with torch.no_grad():
        block32.fused = "never"
        exact, exact_state = block32.prefill(x, layout, pe)
        block16.fused = "never"
        ref, ref_state = block16.prefill(x16, layout, pe16)
        block16.fused = "auto"
        assert block16._use_fused(x16)
        block16.fused = "always"  # no silent fallback: a kernel failure must fail the test
        out, state = block16.prefill(x16, layout, pe16)
        out2, _ = block16(x16, position_embeddings=pe16, linmu_layout=layout)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out2, out, atol=0, rtol=0)

    def check(name, got, ref, exact, rel):
        scale = exact.abs().max().item()
        err_ref = (ref.float() - exact).abs().max().item()
        err = (got.float() - exact).abs().max().item()
        print(f"layer {layer} {name}: scale {scale:.3f} err reference {err_ref:.4g} fused {err:.4g}")
        assert err <= 2 * err_ref + rel * scale, (name, err, err_ref, scale)

    check("output", out, ref, exact, 2e-3)
    check("ssm state", state.flex.ssm, ref_state.flex.ssm, exact_state.flex.ssm, 2e-3)
    check("conv state", state.flex.conv, ref_state.flex.conv, exact_state.flex.conv, 2**-8)
    check("ring keys", state.swin.k, ref_state.swin.k, exact_state.swin.k, 2**-8)
    check("ring values", state.swin.v, ref_state.swin.v, exact_state.swin.v, 2**-8)
    torch.testing.assert_close(state.swin.valid, ref_state.swin.valid)
