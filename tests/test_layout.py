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


@pytest.mark.parametrize("layer", range(4))
def test_flex_scan_plan_rows(layer):
    """Forward rows follow the layer's scan order per batch row; backward rows are each span in reversed scan
    order, packed span after span, with positions counted inside the reversed span."""
    spans = [VisualSpan(0, 2, (2, 2, 3), "video"), VisualSpan(0, 20, (1, 3, 2), "image"),
             VisualSpan(1, 0, (3, 2, 2), "video")]
    B, L = 2, 30
    layout = TokenLayout.from_spans(B, L, spans)
    plan = layout.flex_scan_plan(layer)
    fwd, bwd, bwd_pos, cu = [], [], [], [0]
    for b in range(B):
        order = list(range(L))
        for s in (s for s in spans if s.batch == b):
            order[s.start:s.start + s.length] = expected_scan(s, layer)
        fwd += [b * L + i for i in order]
    for s in spans:
        rev = [s.batch * L + i for i in reversed(expected_scan(s, layer))]
        bwd += rev
        bwd_pos += list(range(len(rev)))
        cu.append(cu[-1] + len(rev))
    assert plan.fwd_src.tolist() == fwd
    assert plan.fwd_segpos.tolist() == list(range(L)) * B
    assert torch.equal(plan.fwd_src[plan.fwd_row], torch.arange(B * L))
    assert plan.bwd_src.tolist() == bwd and plan.bwd_segpos.tolist() == bwd_pos
    assert plan.cu_seqlens.tolist() == cu and plan.cu_seqlens_cpu.tolist() == cu
    hit = plan.bwd_row >= 0
    assert torch.equal(hit, layout.is_visual.reshape(-1))
    assert torch.equal(plan.bwd_src[plan.bwd_row[hit]], torch.arange(B * L)[hit])
    assert layout.flex_scan_plan(layer) is plan  # memoised
