"""The decode state is updated in place: `ssd_step(out=state)` equals the out-of-place step, and a LinMUCache keeps
the same SSM buffers (what a captured CUDA graph replays on) while cached decode still equals a full recompute."""

import pytest
import torch

import linmu
from linmu.inference.cache import LinMUCache
from linmu.ops.ssd import ssd_step
from linmu.tiny import tiny_qwen2_vl, tiny_qwen2_vl_inputs


def test_ssd_step_into_out_equals_the_out_of_place_step():
    torch.manual_seed(0)
    b, h, p, n = 2, 3, 4, 5
    state = torch.randn(b, h, p, n)
    x = torch.randn(b, h, p, dtype=torch.bfloat16)
    dt, A = torch.rand(b, h), -torch.rand(h)
    B, C, D = torch.randn(b, h, n), torch.randn(b, h, n), torch.randn(h)
    y_ref, s_ref = ssd_step(state, x, dt, A, B, C, D)
    buf = state.clone()
    y, s = ssd_step(buf, x, dt, A, B, C, D, out=buf)
    assert s is buf  # updated in place, no new state tensor
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(buf, s_ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(buf, state)
    # into a separate buffer, leaving the input alone
    other = torch.empty_like(state)
    ssd_step(state, x, dt, A, B, C, D, out=other)
    torch.testing.assert_close(other, s_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out must be"):
        ssd_step(state, x, dt, A, B, C, D, out=torch.empty(b, h, p, n, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        ssd_step(state, x, dt, A, B, C, D, out=torch.empty(b, h, n, p).transpose(-1, -2))


def test_cached_decode_updates_the_cache_buffers_in_place_and_equals_recompute():
    teacher = tiny_qwen2_vl(seed=3)
    torch.manual_seed(0)
    student = linmu.convert(teacher, linmu.MMateConfig(window=(2, 2, 2), text_window=8, chunk_size=16,
                                                       init="mamba2"))
    inputs = tiny_qwen2_vl_inputs(student, seed=4)
    with torch.no_grad():
        cache = LinMUCache(student.mmate_blocks(), batch_size=1)
        ptrs = [layer.state.flex.ssm.data_ptr() for layer in cache.layers]
        out = student.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False)
        ref = student.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, ref)
    assert [layer.state.flex.ssm.data_ptr() for layer in cache.layers] == ptrs
    assert cache.layers[0].state.flex.update_in_place and cache.layers[0].state.swin.update_in_place
    # a state that is not a cache's stays untouched by step()
    block = student.mmate_blocks()[0]
    state = cache.layers[0].state
    loose = type(state.flex)(state.flex.conv.clone(), state.flex.ssm.clone())
    before = loose.ssm.clone()
    u = torch.randn(1, 1, student.config.text_config.hidden_size)
    with torch.no_grad():
        _, new = block.flex.step(u, loose)
    assert torch.equal(loose.ssm, before) and not torch.equal(new.ssm, before)
    sw = state.swin
    loose_swin = type(sw)(sw.k.clone(), sw.v.clone(), sw.valid.clone(), sw.pos.clone())
    k_before = loose_swin.k.clone()
    cos = torch.ones(1, 1, block.swin.head_dim)
    with torch.no_grad():
        _, new_swin = block.swin.step(u, loose_swin, (cos, torch.zeros_like(cos)))
    assert torch.equal(loose_swin.k, k_before) and not torch.equal(new_swin.k, k_before)
    # the cache's own ring is written in place: the step returns its buffers
    with torch.no_grad():
        _, own = block.swin.step(u, sw, (cos, torch.zeros_like(cos)))
    assert own.k is sw.k and own.valid is sw.valid


@pytest.mark.gpu
@pytest.mark.parametrize("with_D", [True, False])
def test_fused_triton_step_equals_the_torch_step(with_D):
    from linmu.ops.ssd_decode import fused_step_supported

    torch.manual_seed(1)
    b, h, p, n = 5, 6, 64, 128
    state = torch.randn(b, h, p, n, device="cuda")
    x = torch.randn(b, h, p, device="cuda", dtype=torch.bfloat16)
    dt, A = torch.rand(b, h, device="cuda") * 0.5, -torch.rand(h, device="cuda")
    B, C = torch.randn(b, h, n, device="cuda"), torch.randn(b, h, n, device="cuda")
    D = torch.randn(h, device="cuda") if with_D else None
    assert fused_step_supported(state, D)
    ref_state = state.clone()
    y_ref, _ = ssd_step(ref_state, x, dt, A, B, C, D, out=ref_state, impl="torch")
    buf = state.clone()
    y, s = ssd_step(buf, x, dt, A, B, C, D, out=buf)
    assert s is buf and y.dtype == torch.bfloat16
    torch.testing.assert_close(buf, ref_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    # the environment switch keeps the torch step
    import os

    os.environ["LINMU_FUSED_SSD_STEP"] = "0"
    try:
        from linmu.ops.ssd_decode import fused_step_enabled

        assert not fused_step_enabled()
    finally:
        del os.environ["LINMU_FUSED_SSD_STEP"]
    # a second step from the updated state, and the out-of-place call stays on the torch path
    y2, _ = ssd_step(buf, x, dt, A, B, C, D, out=buf)
    y2_ref, new = ssd_step(ref_state, x, dt, A, B, C, D)
    torch.testing.assert_close(buf, new, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2.float(), y2_ref.float(), rtol=2e-2, atol=2e-2)
