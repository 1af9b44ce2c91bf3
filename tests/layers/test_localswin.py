import pytest
import torch

from linmu.config import MMateConfig
from linmu.layers.localswin import LocalSwin
from tests.helpers import extend_with_text, mixed_layout, random_rope


def make_swin(layer_idx=1, heads=(4, 2), D=8, hidden=32, **cfg):
    torch.manual_seed(99 + layer_idx)
    return LocalSwin(hidden, heads[0], heads[1], D, layer_idx, MMateConfig(**cfg))


@pytest.mark.parametrize("text_window,n_sink", [(4, 0), (6, 2), (64, 3)])
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_prefill_then_step_equals_full_forward(text_window, n_sink, layer_idx):
    m = make_swin(layer_idx, window=(2, 2, 2), text_window=text_window, n_sink=n_sink)
    layout, L = mixed_layout(batch_size=2)
    n = 9
    u = torch.randn(2, L + n, 32)
    cos, sin = random_rope(2, L + n, 8)
    full = m(u, extend_with_text(layout, n), (cos, sin))
    core, state = m(u[:, :L], layout, (cos[:, :L], sin[:, :L]), return_state=True)
    torch.testing.assert_close(core, full[:, :L], atol=1e-5, rtol=1e-5)
    for t in range(n):
        s = slice(L + t, L + t + 1)
        out, state = m.step(u[:, s], state, (cos[:, s], sin[:, s]))
        torch.testing.assert_close(out, full[:, s], atol=1e-5, rtol=1e-5)


def test_fast_path_equals_reference():
    layout, L = mixed_layout(batch_size=2)
    u = torch.randn(2, L, 32)
    cos, sin = random_rope(2, L, 8)
    a = make_swin(1, window=(2, 2, 2), text_window=5, n_sink=2, attn_impl="sdpa")
    b = make_swin(1, window=(2, 2, 2), text_window=5, n_sink=2, attn_impl="reference")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(u, layout, (cos, sin)), b(u, layout, (cos, sin)), atol=1e-5, rtol=1e-5)


def test_visual_token_sees_only_its_window():
    m = make_swin(0, window=(1, 2, 2), text_window=4).double()
    layout, L = mixed_layout()
    u = torch.randn(1, L, 32, dtype=torch.float64)
    cos, sin = random_rope(1, L, 8, torch.float64)
    base = m(u, layout, (cos, sin))
    ids = layout.window_ids((1, 2, 2), False).ids[0]
    for j in range(L):
        u2 = u.clone()
        u2[0, j] += 1.0
        moved = (m(u2, layout, (cos, sin)) - base).abs().amax(-1)[0]
        for i in range(L):
            if ids[i] >= 0:
                assert (moved[i] > 0) == bool(ids[j] == ids[i]), (i, j)
            else:
                assert (moved[i] > 0) == (i - 4 < j <= i), (i, j)
