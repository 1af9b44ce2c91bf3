import itertools

import pytest
import torch

from linmu.layout import TokenLayout, VisualSpan
from tests.helpers import mixed_layout

# the scan orders of LINMU.md §3.1 written out by axis name, outermost first
ORDERS = {0: "THW", 1: "TWH", 2: "HWT", 3: "WHT"}


def expected_scan(span: VisualSpan, layer: int) -> list[int]:
    """Positions of the span's tokens in the order the layer scans them, from the written-out order names."""
    T, H, W = span.grid
    name = ORDERS[layer % 4] if T > 1 else ORDERS[layer % 2]
    sizes = dict(T=T, H=H, W=W)
    out = []
    for c in itertools.product(*[range(sizes[a]) for a in name]):
        coord = dict(zip(name, c))
        out.append(span.start + coord["T"] * H * W + coord["H"] * W + coord["W"])
    return out


@pytest.mark.parametrize("layer", range(4))
def test_scan_permutation_matches_written_orders(layer):
    layout, L = mixed_layout(batch_size=2)
    perm_inv = layout.scan_permutation(layer)
    expected = list(range(L))
    for s in layout.spans:
        if s.batch == 0:
            expected[s.start:s.start + s.length] = expected_scan(s, layer)
    if perm_inv is None:
        assert expected == list(range(L))
        return
    perm, inv = perm_inv
    assert perm[0].tolist() == expected and perm[1].tolist() == expected
    x = torch.randn(2, L)
    assert torch.equal(x.gather(1, perm).gather(1, inv), x)


def test_fixed_order_is_identity():
    layout, _ = mixed_layout()
    assert all(layout.scan_permutation(layer, rotate=False) is None for layer in range(4))


def test_span_segments():
    layout, L = mixed_layout(batch_size=2)
    seg = layout.span_segments()
    assert seg.cu_seqlens.tolist() == [0, 6, 18, 24, 36]
    assert seg.index[:6].tolist() == list(range(3, 9))
    assert seg.index[24:30].tolist() == [L + p for p in range(11, 17)]
    assert seg.to_end[:6].tolist() == [5, 4, 3, 2, 1, 0]


def test_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="grid metadata"):
        TokenLayout.from_spans(1, 10, [VisualSpan(0, 5, (2, 2, 2))])
    with pytest.raises(ValueError, match="overlaps"):
        TokenLayout.from_spans(1, 20, [VisualSpan(0, 0, (1, 2, 2)), VisualSpan(0, 2, (1, 2, 2))])
    with pytest.raises(ValueError, match="batch row"):
        TokenLayout.from_spans(1, 20, [VisualSpan(1, 0, (1, 2, 2))])
