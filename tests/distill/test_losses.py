import math

import pytest
import torch
import torch.nn.functional as F

from linmu.distill.losses import alignment_mse, counted_tokens, token_ce, token_kd, top1_agreement


def test_kd_is_zero_at_equality_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    mask = torch.ones(2, 7, dtype=torch.bool)
    assert token_kd(logits, logits, mask, 2.0).abs() < 1e-6
    assert token_kd(logits + torch.randn_like(logits), logits, mask, 2.0) > 0


def test_kd_direction_is_forward_kl_teacher_to_student():
    # one position, two classes: closed form KL(p_t || p_s) = sum p_t log(p_t / p_s)
    t = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # target position 1: p_t = (0.75, 0.25)
    s = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # p_s = (0.5, 0.5)
    mask = torch.tensor([[False, True]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # logits at position 0 predict target position 1
    t_shift = torch.stack([t[0, 1], t[0, 0]])[None]
    s_shift = torch.stack([s[0, 1], s[0, 0]])[None]
    assert token_kd(s_shift, t_shift, mask, 1.0).item() == pytest.approx(kl, rel=1e-6)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert token_kd(t_shift, s_shift, mask, 1.0).item() == pytest.approx(reverse, rel=1e-6)


def test_kd_temperature_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(1, 5, 9), torch.randn(1, 5, 9)
    mask = torch.ones(1, 5, dtype=torch.bool)
    T = 3.0
    p_t = F.softmax(t[:, :-1] / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s[:, :-1] / T, -1))).sum(-1).mean() * T * T
    assert token_kd(s, t, mask, T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_uncounted_tokens_do_not_matter():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    labels = torch.full((2, 6), -100)
    labels[0, 3:] = 1
    labels[1, 5] = 2
    mask = counted_tokens(labels, None, "answer")
    base = token_kd(s, t, mask, 1.0)
    s2 = s.clone()
    s2[0, :2] += 10  # logits of positions 0-1 predict targets 1-2, which do not count
    s2[1, :4] += 10
    assert torch.allclose(token_kd(s2, t, mask, 1.0), base)
    # averaged per counted token: 3 + 1 = 4 targets
    per_tok = [F.kl_div(F.log_softmax(s[b, p - 1], -1), F.log_softmax(t[b, p - 1], -1), log_target=True,
                        reduction="sum") for b, p in [(0, 3), (0, 4), (0, 5), (1, 5)]]
    assert base.item() == pytest.approx(torch.stack(per_tok).mean().item(), rel=1e-5)


def test_ce_matches_torch_and_ignores_minus_100():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert token_ce(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_alignment_mse_masks_padding_and_is_zero_at_equality():
    torch.manual_seed(4)
    a, b = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert alignment_mse(a, a) == 0
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    b2 = b.clone()
    b2[0, 0] += 100  # padding position
    assert torch.allclose(alignment_mse(a, b, mask), alignment_mse(a, b2, mask))
    expected = ((a - b) ** 2).mean(-1)[mask].mean()
    assert alignment_mse(a, b, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_alignment_mse_with_float_weights_is_the_weighted_mean():
    torch.manual_seed(5)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    w = torch.rand(2, 5) * 3
    per_pos = ((a - b) ** 2).mean(-1)
    assert alignment_mse(a, b, w).item() == pytest.approx(((per_pos * w).sum() / w.sum()).item(), rel=1e-6)
    assert alignment_mse(a, b, torch.ones(2, 5)).item() == pytest.approx(alignment_mse(a, b).item(), rel=1e-6)


def test_nonpad_mode_and_errors():
    am = torch.tensor([[0, 1, 1]])
    assert counted_tokens(None, am, "nonpad").tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="needs labels"):
        counted_tokens(None, am, "answer")
    with pytest.raises(ValueError, match="unknown"):
        counted_tokens(None, am, "all")


def test_top1_agreement():
    t = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    s = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    assert top1_agreement(s, t, torch.ones(1, 3, dtype=torch.bool)).item() == 0.5
