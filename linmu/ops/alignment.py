"""Masked mean-squared alignment error: the per-layer distillation target of stages 1-2 (LINMU.md §5)."""

import torch


def alignment_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per counted position, averaged over channels: student, teacher (B, L, D), mask (B, L).

    ``mask`` is boolean (which positions count) or a non-negative float weight per position (a weighted mean).
    Returns 0 (with a gradient path) when no position counts.
    """
    per_pos = (student.float() - teacher.float()).pow(2).mean(-1)
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)
