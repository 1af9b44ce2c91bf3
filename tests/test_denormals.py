import torch

from linmu.denormals import flush_denormals

TINY = 1e-40  # subnormal in float32 (smallest normal: 1.18e-38)


def _subnormal_survives() -> bool:
    x = torch.tensor([TINY], dtype=torch.float32)
    return bool((x * 1.0).item() != 0.0)


def test_flushing_is_scoped_and_nests():
    assert _subnormal_survives()  # the default: subnormals are kept
    with flush_denormals() as on:
        if not on:  # a CPU without FTZ/DAZ: the block is a no-op, and says so
            assert _subnormal_survives()
            return
        assert not _subnormal_survives()
        with flush_denormals():
            assert not _subnormal_survives()
        assert not _subnormal_survives()  # the inner block's exit leaves the outer one's flushing on
        # a normal float and its arithmetic are untouched
        assert torch.tensor([1e-30]).mul(2.0).item() == torch.tensor([2e-30]).item()
    assert _subnormal_survives()
    with flush_denormals(enabled=False) as on:
        assert not on and _subnormal_survives()
