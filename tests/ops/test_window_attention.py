"""Tests of linmu.ops.window_attention (CPU, fast)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from linmu.ops.window_attention import (
    WindowPartition,
    build_window_partition,
    local_window_attention,
    window_attention_mask,
    window_decode_attention,
)

# --------------------------------------------------------------------------------------------------------------
# Random layouts
# --------------------------------------------------------------------------------------------------------------


def _grid_window_ids(t, h, w, win, shift, first_id):
    """Window ids of a row-major (t, h, w) grid cut into clipped (possibly shifted) 3-D windows.

    Windows of a row-major grid are scattered over the sequence, and clipping at the borders (plus the shift)
    gives windows of unequal sizes."""
    ids = {}
    out = []
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                key = tuple((c + s) // n for c, s, n in zip((ti, hi, wi), shift, win))
                if key not in ids:
                    ids[key] = first_id + len(ids)
                out.append(ids[key])
    return out, first_id + len(ids)


def _row_layout(L, kind, rng, pad=0):
    """Return (window_id list, key_valid list) of length L.

    kind: "mixed" (text and visual grids interleaved), "text" (all text), "visual" (all visual)."""
    n = L - pad
    wid = [-1] * pad
    if kind == "text":
        wid += [-1] * n
    elif kind == "visual":
        next_id = 0
        while len(wid) < L:
            t, h, w = rng.randint(1, 3), rng.randint(2, 5), rng.randint(2, 6)
            ids, next_id = _grid_window_ids(t, h, w, (2, 2, 3), (rng.randint(0, 1), 1, rng.randint(0, 2)), next_id)
            wid += ids[: L - len(wid)]
    else:
        next_id = 0
        while len(wid) < L:
            wid += [-1] * min(rng.randint(1, 6), L - len(wid))
            if len(wid) >= L:
                break
            t, h, w = rng.randint(1, 2), rng.randint(2, 4), rng.randint(3, 5)
            ids, next_id = _grid_window_ids(t, h, w, (1, 2, 2), (0, rng.randint(0, 1), 1), next_id)
            wid += ids[: L - len(wid)]
    valid = [False] * pad + [True] * n
    return wid, valid


def make_layout(L, kinds, seed, pads=None):
    rng = random.Random(seed)
    pads = pads or [0] * len(kinds)
    rows = [_row_layout(L, k, rng, p) for k, p in zip(kinds, pads)]
    window_id = torch.tensor([r[0] for r in rows], dtype=torch.long)
    key_valid = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    return window_id, key_valid


def loop_masks(window_id, key_valid, text_window, n_sink):
    """The mask rule written as a plain double loop, independent of the library.

    Returns (mask with key_valid, mask without key_valid)."""
    B, L = window_id.shape
    wid = window_id.tolist()
    kv = key_valid.tolist()
    m = torch.zeros(B, L, L, dtype=torch.bool)
    m_all = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            row, row_all = [False] * L, [False] * L
            for j in range(L):
                a = wid[b][i] >= 0 and wid[b][j] == wid[b][i]
                t = wid[b][i] == -1 and i - text_window < j <= i
                c = j < n_sink and j <= i
                row_all[j] = a or t or c
                row[j] = row_all[j] and kv[b][j]
            m[b, i] = torch.tensor(row)
            m_all[b, i] = torch.tensor(row_all)
    return m, m_all


# Layouts: B = 3 rows with different layouts, left padding on some rows, odd lengths.
LAYOUTS = {
    "mixed_pad": (["mixed", "text", "visual"], [3, 0, 5]),
    "mixed_nopad": (["visual", "mixed", "mixed"], [0, 0, 2]),
    "all_text_row": (["text", "mixed", "text"], [0, 4, 0]),
    "all_visual_row": (["visual", "visual", "mixed"], [0, 1, 0]),
}


def _case_params():
    cases = []
    for L in (37, 101):
        for tw in (1, 5, L, L + 13) if L < 100 else (1, 5, L):
            for ns in (0, 4):
                for name in LAYOUTS:
                    cases.append((L, tw, ns, name))
    return cases


MASK_CASES = _case_params()


@pytest.mark.parametrize("L,text_window,n_sink,layout", MASK_CASES)
def test_mask_matches_loop(L, text_window, n_sink, layout):
    kinds, pads = LAYOUTS[layout]
    wid, kv = make_layout(L, kinds, seed=L * 1000 + text_window * 10 + n_sink, pads=pads)
    got = window_attention_mask(wid, text_window=text_window, n_sink=n_sink, key_valid=kv)
    assert got.shape == (3, L, L) and got.dtype == torch.bool
    want, want_nokv = loop_masks(wid, kv, text_window, n_sink)
    assert torch.equal(got, want)
    got_nokv = window_attention_mask(wid, text_window=text_window, n_sink=n_sink)
    assert torch.equal(got_nokv, want_nokv)


def test_layout_has_scattered_unequal_windows():
    # Sanity of the generator: windows are non-contiguous and of unequal sizes, and the sinks of a visual row lie
    # inside a window.
    wid, _ = make_layout(101, ["visual", "mixed", "mixed"], seed=1)
    p = build_window_partition(wid)
    assert (p.index.max(1).values - p.index.clamp(min=0).min(1).values + 1 > p.counts).any()
    assert p.counts.unique().numel() > 1
    assert (wid[0, :4] >= 0).all()


# --------------------------------------------------------------------------------------------------------------
# sdpa vs reference
# --------------------------------------------------------------------------------------------------------------


def _qkv(B, L, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=dtype)
    return q, k, v


SDPA_CASES = []
for _L in (37, 101):
    for _tw in (1, 5, _L + 13):
        for _ns in (0, 4):
            for _name in LAYOUTS:
                SDPA_CASES.append((_L, _tw, _ns, _name))
HEADS = [(4, 2), (6, 1), (2, 2)]


@pytest.mark.parametrize("L,text_window,n_sink,layout", SDPA_CASES)
def test_sdpa_matches_reference_fwd_bwd(L, text_window, n_sink, layout):
    idx = SDPA_CASES.index((L, text_window, n_sink, layout))
    Hq, Hkv = HEADS[idx % len(HEADS)]
    kinds, pads = LAYOUTS[layout]
    wid, kv = make_layout(L, kinds, seed=idx, pads=pads)
    q, k, v = _qkv(3, L, Hq, Hkv, 16, seed=idx)
    go = torch.randn(3, L, Hq, 16, generator=torch.Generator().manual_seed(idx + 7))

    outs, grads = {}, {}
    for impl in ("reference", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = local_window_attention(qq, kk, vv, wid, text_window=text_window, n_sink=n_sink, key_valid=kv, impl=impl)
        assert out.shape == q.shape and out.dtype == q.dtype
        (out * go).sum().backward()
        outs[impl] = out.detach()
        grads[impl] = (qq.grad, kk.grad, vv.grad)
    assert torch.isfinite(outs["sdpa"]).all()
    torch.testing.assert_close(outs["sdpa"], outs["reference"], atol=1e-5, rtol=0)
    for name, gs, gr in zip("qkv", grads["sdpa"], grads["reference"]):
        assert torch.isfinite(gs).all(), name
        torch.testing.assert_close(gs, gr, atol=1e-5, rtol=0, msg=lambda m: f"grad {name}: {m}")


def test_partition_reuse_and_fields():
    wid = torch.tensor([[-1, 0, 1, 0, 1, -1, 2], [3, 3, -1, -1, 3, 5, 5]])
    p = build_window_partition(wid)
    assert isinstance(p, WindowPartition)
    assert p.num_windows == 5 and p.max_window == 3 and p.num_visual == 10 and p.num_text == 4
    assert p.index.tolist() == [[1, 3, -1], [2, 4, -1], [6, -1, -1], [0, 1, 4], [5, 6, -1]]
    assert p.batch.tolist() == [0, 0, 0, 1, 1]
    assert p.window_ids.tolist() == [0, 1, 2, 3, 5]
    assert p.counts.tolist() == [2, 2, 1, 3, 2]
    assert torch.equal(p.slot_valid, p.index >= 0)
    assert torch.equal(p.is_visual, wid >= 0)
    # vis_slot / vis_token map the same tokens.
    assert torch.equal(p.flat_index.reshape(-1)[p.vis_slot], p.vis_token)

    q, k, v = _qkv(2, 7, 4, 2, 8, seed=3)
    a = local_window_attention(q, k, v, wid, text_window=3, n_sink=2, partition=p)
    b = local_window_attention(q, k, v, wid, text_window=3, n_sink=2, impl="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_visual_no_text_and_fully_padded_rows():
    # Row 0 fully padded (every query sees no key -> 0), row 1 all visual, row 2 all text.
    L = 20
    wid = torch.tensor([[-1] * L, [i // 3 for i in range(L)], [-1] * L])
    kv = torch.ones(3, L, dtype=torch.bool)
    kv[0] = False
    q, k, v = (t.requires_grad_() for t in _qkv(3, L, 2, 1, 8, seed=5))
    out = local_window_attention(q, k, v, wid, text_window=4, n_sink=2, key_valid=kv)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = local_window_attention(q, k, v, wid, text_window=4, n_sink=2, key_valid=kv, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Only text / only visual in the whole batch.
    for w in (torch.full((2, L), -1), torch.arange(2 * L).reshape(2, L) // 5):
        q2, k2, v2 = _qkv(2, L, 2, 2, 8, seed=6)
        a = local_window_attention(q2, k2, v2, w, text_window=6, n_sink=3)
        b = local_window_attention(q2, k2, v2, w, text_window=6, n_sink=3, impl="reference")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# bf16, causal equivalence
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text_window,n_sink,layout", [(5, 4, "mixed_pad"), (101, 0, "all_visual_row"), (1, 4, "mixed_nopad")]
)
def test_bf16_error_bounded_by_reference_bf16(text_window, n_sink, layout):
    L = 101
    kinds, pads = LAYOUTS[layout]
    wid, kv = make_layout(L, kinds, seed=11, pads=pads)
    q, k, v = (t.bfloat16() for t in _qkv(3, L, 4, 2, 32, seed=11))
    kw = dict(text_window=text_window, n_sink=n_sink, key_valid=kv)
    exact = local_window_attention(q.double(), k.double(), v.double(), wid, impl="reference", **kw)
    out_sdpa = local_window_attention(q, k, v, wid, impl="sdpa", **kw)
    out_ref = local_window_attention(q, k, v, wid, impl="reference", **kw)
    assert out_sdpa.dtype == torch.bfloat16 and out_ref.dtype == torch.bfloat16
    err_sdpa = (out_sdpa.double() - exact).abs().max().item()
    err_ref = (out_ref.double() - exact).abs().max().item()
    assert err_sdpa <= 2 * err_ref + 4e-3, (err_sdpa, err_ref)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("text_window", [37, 64])
def test_all_text_full_window_is_causal_attention(Hq, Hkv, text_window):
    L = 37
    q, k, v = _qkv(2, L, Hq, Hkv, 16, seed=2)
    wid = torch.full((2, L), -1)
    out = local_window_attention(q, k, v, wid, text_window=text_window)
    G = Hq // Hkv
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(G, 2).transpose(1, 2),
        v.repeat_interleave(G, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_window,n_sink", [(8, 0), (8, 4), (3, 4), (50, 4)])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (3, 3)])
def test_decode_matches_last_row(text_window, n_sink, Hq, Hkv):
    L, D = 41, 16
    wid, kv = make_layout(L, ["mixed", "visual", "text"], seed=text_window + n_sink, pads=[2, 0, 6])
    wid[:, -1] = -1  # the new token is text
    q, k, v = _qkv(3, L, Hq, Hkv, D, seed=9)
    ref = local_window_attention(q, k, v, wid, text_window=text_window, n_sink=n_sink, key_valid=kv, impl="reference")

    # Ring buffer: sink slots + text_window slots (+ 2 spare invalid slots), filled in a shuffled order.
    S = n_sink + text_window + 2
    positions = sorted(set(range(min(n_sink, L))) | set(range(max(L - text_window, 0), L)))
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(3, S, Hkv, D, generator=gen) * 10  # garbage in unused slots
    v_cache = torch.randn(3, S, Hkv, D, generator=gen) * 10
    valid = torch.zeros(3, S, dtype=torch.bool)
    slots = torch.randperm(S, generator=gen)[: len(positions)]
    for s, p in zip(slots.tolist(), positions):
        k_cache[:, s] = k[:, p]
        v_cache[:, s] = v[:, p]
        valid[:, s] = kv[:, p]
    out = window_decode_attention(q[:, -1:], k_cache, v_cache, valid)
    assert out.shape == (3, 1, Hq, D)
    torch.testing.assert_close(out, ref[:, -1:], atol=1e-5, rtol=0)


def test_decode_no_valid_slot_is_zero():
    q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[1, 2] = True
    out = window_decode_attention(q, kc, vc, valid)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1, 0], vc[1, 2].repeat_interleave(2, 0))


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


def test_errors():
    q, k, v = _qkv(2, 6, 4, 2, 8)
    wid = torch.full((2, 6), -1)
    with pytest.raises(ValueError, match="unknown impl.*auto.*sdpa.*reference"):
        local_window_attention(q, k, v, wid, text_window=3, impl="flash")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        local_window_attention(q, k[:, :, :1].expand(2, 6, 3, 8), v[:, :, :1].expand(2, 6, 3, 8), wid, text_window=3)
    with pytest.raises(ValueError, match="disagree"):
        local_window_attention(q, k[:, :5], v[:, :5], wid, text_window=3)
    with pytest.raises(ValueError, match="k shape"):
        local_window_attention(q, k, v[..., :4], wid, text_window=3)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        local_window_attention(q[0], k, v, wid, text_window=3)
    with pytest.raises(ValueError, match="window_id shape"):
        local_window_attention(q, k, v, wid[:, :5], text_window=3)
    with pytest.raises(ValueError, match="key_valid shape"):
        local_window_attention(q, k, v, wid, text_window=3, key_valid=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_valid"):
        local_window_attention(q, k, v, wid, text_window=3, key_valid=torch.ones(2, 6))
    with pytest.raises(TypeError, match="integer"):
        local_window_attention(q, k, v, wid.float(), text_window=3)
    with pytest.raises(ValueError, match="text_window"):
        local_window_attention(q, k, v, wid, text_window=0)
    with pytest.raises(ValueError, match="n_sink"):
        local_window_attention(q, k, v, wid, text_window=3, n_sink=-1)
    with pytest.raises(ValueError, match="partition was built"):
        local_window_attention(q, k, v, wid, text_window=3, partition=build_window_partition(wid[:, :5]))
    with pytest.raises(ValueError, match="-1"):
        build_window_partition(torch.tensor([[-2, 0]]))
    # decode
    with pytest.raises(ValueError, match=r"\(B, 1, Hq, D\)"):
        window_decode_attention(q, k, v, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache_valid shape"):
        window_decode_attention(q[:, :1], k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        window_decode_attention(q[:, :1, :3], k, v, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="v_cache shape"):
        window_decode_attention(q[:, :1], k, v[:, :5], torch.ones(2, 6, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------
# window order (window_attention_sorted) and the grouped / masked visual paths
# --------------------------------------------------------------------------------------------------------------


def test_partition_groups_windows_by_size():
    wid, kv = make_layout(101, ["visual", "mixed", "mixed"], seed=3, pads=[0, 2, 0])
    p = build_window_partition(wid, kv)
    assert p.visual_keys_valid is True
    assert sum(n * c for c, n, _ in p.groups) == p.num_visual == p.order.numel()
    sizes = [c for c, _, _ in p.groups]
    assert sizes == sorted(set(sizes)) and len(sizes) > 1
    flat_wid = wid.reshape(-1)
    for c, n, off in p.groups:
        win = p.order[off:off + n * c].view(n, c)
        # every row of a group is one whole window: one id, increasing positions, the window's full size
        assert (flat_wid[win] == flat_wid[win[:, :1]]).all()
        assert (win.diff(dim=1) > 0).all() and (win // 101 == win[:, :1] // 101).all()
        for w in win:
            assert int((flat_wid.view(3, 101)[w[0] // 101] == flat_wid[w[0]]).sum()) == c
    assert torch.equal(p.token_order.sort().values, torch.arange(3 * 101))
    assert torch.equal(p.token_order[p.token_row], torch.arange(3 * 101))
    assert torch.equal(p.token_order[p.num_visual:], (wid.reshape(-1) < 0).nonzero().squeeze(1))
    # a padding key inside a window is recorded
    kv2 = kv.clone()
    kv2[0, 10] = False
    assert build_window_partition(wid, kv2).visual_keys_valid is False
    assert build_window_partition(wid).visual_keys_valid is None


@pytest.mark.parametrize("n_sink,pad_visual", [(0, False), (3, False), (0, True)])
def test_window_order_entry_matches_reference(n_sink, pad_visual):
    """window_attention_sorted on rows in the partition's order, written into a strided buffer, equals the
    reference; with sinks or a padding key inside a window it takes the masked path (also checked)."""
    from linmu.ops.window_attention import window_attention_sorted

    L = 101
    wid, kv = make_layout(L, ["mixed", "visual", "mixed"], seed=7, pads=[3, 0, 0])
    if pad_visual:
        kv[1, 5] = False  # a visual token that is a padding key
    q, k, v = _qkv(3, L, 6, 2, 16, seed=4)
    p = build_window_partition(wid, kv)
    assert p.visual_keys_valid is (not pad_visual)
    order = p.token_order
    qs, ks, vs = (t.reshape(3 * L, t.shape[2], 16)[order] for t in (q, k, v))
    buf = torch.full((3 * L, 2, 6, 16), float("nan"))
    out = window_attention_sorted(qs, ks, vs, wid, p, text_window=9, n_sink=n_sink, key_valid=kv, out=buf[:, 1])
    assert out.data_ptr() == buf[:, 1].data_ptr() and torch.isnan(buf[:, 0]).all()
    ref = local_window_attention(q, k, v, wid, text_window=9, n_sink=n_sink, key_valid=kv, impl="reference")
    torch.testing.assert_close(buf[:, 1].reshape(3, L, 6, 16), ref, atol=1e-5, rtol=0)
    # the plain entry point, with a partition built without key_valid (decides with one host sync)
    got = local_window_attention(q, k, v, wid, text_window=9, n_sink=n_sink, key_valid=kv,
                                 partition=build_window_partition(wid))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_text_blocks_skip_visual_only_blocks():
    from linmu.ops.window_attention import _text_blocks

    L = 64
    wid = torch.full((2, L), -1)
    wid[0, 10:60] = torch.arange(50) // 7  # row 0: text only in blocks 0 and 3 of 16 positions
    wid[1] = torch.arange(L) // 8  # row 1: all visual
    p = build_window_partition(wid)
    blocks, keep, dest = _text_blocks(p, 16)
    assert blocks.tolist() == [0, 3] and keep is None
    assert dest.tolist() == list(range(16)) + list(range(48, 64))
    blocks, keep, dest = _text_blocks(p, 24)  # 64 = 2 * 24 + 16: the last block is partial
    assert blocks.tolist() == [0, 2] and keep is not None
    assert dest.tolist() == list(range(24)) + list(range(48, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("n_sink", [0, 2])
def test_grouped_windows_bf16_gpu(n_sink):
    """On CUDA the grouped path runs flash SDPA in bf16: its error against a float64 reference stays within twice
    that of the reference computed in bf16 inputs (float32 softmax), plus 4e-3."""
    L = 777
    wid, kv = make_layout(L, ["mixed", "visual", "mixed"], seed=12, pads=[5, 0, 0])
    q, k, v = (t.bfloat16().cuda() for t in _qkv(3, L, 8, 2, 64, seed=12))
    wid, kv = wid.cuda(), kv.cuda()
    kw = dict(text_window=33, n_sink=n_sink, key_valid=kv)
    exact = local_window_attention(q.double(), k.double(), v.double(), wid, impl="reference", **kw)
    out = local_window_attention(q, k, v, wid, impl="sdpa", partition=build_window_partition(wid, kv), **kw)
    ref = local_window_attention(q, k, v, wid, impl="reference", **kw)
    err, err_ref = ((t.double() - exact).abs().max().item() for t in (out, ref))
    assert err <= 2 * err_ref + 4e-3, (err, err_ref)
