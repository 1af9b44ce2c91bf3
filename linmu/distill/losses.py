"""Distillation losses as pure functions (LINMU.md §5).

Every loss is averaged over the positions that count, given as a boolean mask; padding never counts. Token-level
losses use the usual causal shift: logits at position t predict token t+1, so a mask over *target* tokens (labels)
selects logits one position earlier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.alignment import alignment_mse  # noqa: F401  (re-exported: the per-layer loss)


def counted_tokens(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, mode: str = "answer") -> torch.Tensor:
    """Boolean mask (B, L) of target positions that count.

    ``"answer"``: tokens whose label is not -100 (the assistant answers); ``"nonpad"``: every non-padding token.
    """
    if mode == "answer":
        if labels is None:
            raise ValueError("kd_tokens='answer' needs labels marking the answer tokens")
        return labels != -100
    if mode == "nonpad":
        if attention_mask is None:
            raise ValueError("kd_tokens='nonpad' needs the attention mask")
        return attention_mask.bool()
    raise ValueError(f"unknown counted-token mode {mode!r}; use 'answer' or 'nonpad'")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, L) over ``mask``; 0 (with a gradient path) when nothing counts."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _shift(logits: torch.Tensor, target_mask: torch.Tensor):
    """Logits that predict the counted targets: logits[:, :-1] against target_mask[:, 1:]."""
    return logits[:, :-1], target_mask[:, 1:]


def token_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher ‖ student) of the temperature-softened next-token distributions, times T².

    Averaged over counted target tokens (``target_mask`` (B, L) over the label positions; the causal shift is applied
    here). The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    s, m = _shift(student_logits, target_mask)
    t, _ = _shift(teacher_logits, target_mask)
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, L-1)
    return _masked_mean(kl, m) * temperature**2


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token prediction against ``labels`` (-100 = not counted), averaged per counted token.

    Used for supervised CE on the ground truth and sequence-level KD on teacher-generated answers.
    """
    s = logits[:, :-1].float()
    y = labels[:, 1:]
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1).clamp(min=0), reduction="none").view_as(y)
    return _masked_mean(ce, y != -100)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of counted target tokens where student and teacher predict the same next token."""
    s, m = _shift(student_logits, target_mask)
    t, _ = _shift(teacher_logits, target_mask)
    return _masked_mean((s.argmax(-1) == t.argmax(-1)).float(), m)
