"""Local-Swin window membership against a dense mask built independently from (t, h, w) coordinates."""

import pytest
import torch

from linmu.layout import TokenLayout, VisualSpan
from linmu.ops.window_attention import window_attention_mask


def dense_expected(spans, B, L, window, shift, text_window, n_sink, key_valid):
    """Visibility from first principles: same span and same (clipped, optionally shifted) window cell."""
    info = {}
    for n, s in enumerate(spans):
        T, H, W = s.grid
        win = [min(a, g) for a, g in zip(window, s.grid)]
        off = [w // 2 if shift else 0 for w in win]
        for k in range(s.length):
            t, h, w = k // (H * W), (k // W) % H, k % W
            cell = tuple((c + o) // ws for c, o, ws in zip((t, h, w), off, win))
            info[(s.batch, s.start + k)] = (n, cell)
    m = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                if key_valid is not None and not key_valid[b, j]:
                    continue
                if (b, i) in info:
                    ok = info.get((b, j)) == info[(b, i)]
                else:
                    ok = i - text_window < j <= i
                ok = ok or (j < n_sink and j <= i)
                m[b, i, j] = ok
    return m


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("window", [(2, 2, 2), (2, 8, 8), (1, 3, 2)])
def test_window_membership(shift, window):
    # a video whose grid is not a multiple of the window (clipped border windows), an image, text between,
    # and a second row with different spans and left padding
    spans = [VisualSpan(0, 2, (3, 5, 3), "video"), VisualSpan(0, 50, (1, 3, 4), "image"),
             VisualSpan(1, 6, (1, 4, 5), "image"), VisualSpan(1, 30, (5, 2, 3), "video")]
    B, L = 2, 65
    key_valid = torch.ones(B, L, dtype=torch.bool)
    key_valid[1, :3] = False
    layout = TokenLayout.from_spans(B, L, spans, key_valid=key_valid)
    ids = layout.window_ids(window, shift).ids
    for text_window, n_sink in [(4, 0), (7, 3)]:
        got = window_attention_mask(ids, text_window=text_window, n_sink=n_sink, key_valid=key_valid)
        exp = dense_expected(spans, B, L, window, shift, text_window, n_sink, key_valid)
        assert torch.equal(got, exp)


def test_shift_changes_windows_on_odd_layers():
    layout = TokenLayout.from_spans(1, 70, [VisualSpan(0, 0, (4, 4, 4), "video")])
    a = layout.window_ids((2, 2, 2), False).ids
    b = layout.window_ids((2, 2, 2), True).ids
    assert layout.window_ids((2, 2, 2), False).num_windows == 8
    assert layout.window_ids((2, 2, 2), True).num_windows == 27  # 3 cells per axis once shifted by one
    assert not torch.equal(a, b)
