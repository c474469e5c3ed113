"""KD and MLM losses against dense references and hand-computed values; alpha schedules."""

from __future__ import annotations

import math

import pytest
import torch

from mdkd.pipeline.distill.losses import alpha_at, kd_loss, merge_duplicates, mlm_loss
from mdkd.pipeline.distill.config import AlphaConfig


def dense_kd(student_logits, teacher_logits, tau):
    student = torch.log_softmax(student_logits / tau, dim=-1)
    teacher = torch.log_softmax(teacher_logits / tau, dim=-1)
    return tau**2 * (teacher.exp() * (teacher - student)).sum(dim=-1)


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_full_vocabulary_top_k_equals_dense_kl(missing_mass, tau):
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 40, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64) * 3
    values, ids = torch.log_softmax(teacher, dim=-1).topk(40, dim=-1)
    got = kd_loss(student, ids, values, tau, missing_mass)
    torch.testing.assert_close(got.double(), dense_kd(student, teacher, tau), rtol=1e-5, atol=1e-5)


def test_hand_computed_renormalised_top_2():
    # Teacher top-2 probabilities 0.5 and 0.25 -> renormalised 2/3, 1/3; at tau = 2: sqrt -> ∝ 0.8165, 0.5774.
    student = torch.tensor([[0.0, math.log(2.0), 0.0]])
    ids = torch.tensor([[1, 0]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    q = torch.tensor([math.sqrt(2 / 3), math.sqrt(1 / 3)])
    q = q / q.sum()
    s = torch.softmax(student[0] / 2.0, dim=0)[[1, 0]]
    expected = 4.0 * (q * (q.log() - s.log())).sum()
    assert kd_loss(student, ids, logprobs, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hand_computed_rest_bucket():
    # Teacher keeps 0.6 on token 2 and 0.4 elsewhere; the student puts softmax([1, 1, 2]) there; tau = 1.
    student = torch.tensor([[1.0, 1.0, 2.0]])
    s = torch.softmax(student[0], dim=0)
    expected = 0.6 * math.log(0.6 / s[2]) + 0.4 * math.log(0.4 / (1 - s[2]))
    got = kd_loss(student, torch.tensor([[2]]), torch.tensor([[math.log(0.6)]]), 1.0, "rest")
    # The loss is computed in float32 and this KL (~1e-3) is a difference of terms ~0.5: compare absolutely.
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_ids_mapped_to_one_student_token_are_summed_and_dropped_ids_removed():
    torch.manual_seed(1)
    student = torch.randn(2, 10)
    logprobs = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1]]))
    with_duplicates = torch.tensor([[3, 5, 3, -1], [7, 7, 7, 2]])
    merged_ids = torch.tensor([[3, 5, -1, -1], [7, 2, -1, -1]])
    merged_logprobs = torch.log(torch.tensor([[0.6, 0.3, 1.0, 1.0], [0.9, 0.1, 1.0, 1.0]]))
    torch.testing.assert_close(kd_loss(student, with_duplicates, logprobs, 2.0), kd_loss(student, merged_ids, merged_logprobs, 2.0))
    ids, probs = merge_duplicates(with_duplicates, logprobs.exp())
    assert ids.tolist() == [[3, 5, -1, -1], [7, -1, -1, 2]]
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.3, 0.0, 0.0], [0.9, 0.0, 0.0, 0.1]]))


def test_kd_is_zero_when_the_student_matches_and_positive_otherwise():
    teacher = torch.randn(4, 12)
    values, ids = torch.log_softmax(teacher, -1).topk(12, -1)
    assert kd_loss(teacher, ids, values, 2.0).abs().max() < 1e-5
    assert (kd_loss(torch.zeros(4, 12), ids, values, 2.0) > 0).all()


def test_mlm_is_cross_entropy():
    logits, labels = torch.randn(5, 9), torch.tensor([0, 3, 8, 1, 1])
    expected = -torch.log_softmax(logits, -1)[torch.arange(5), labels]
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


def test_alpha_schedules():
    linear = AlphaConfig(schedule="linear", start=1.0, steps=100)
    assert [alpha_at(t, linear, 1000) for t in (0, 50, 100, 150)] == [1.0, 0.5, 0.0, 0.0]
    assert alpha_at(25, AlphaConfig(schedule="linear", start=0.8), 100) == pytest.approx(0.6)
    assert alpha_at(999, AlphaConfig(schedule="constant", start=0.3), 10) == 0.3
    step = AlphaConfig(schedule="step", start=1.0, steps=10)
    assert [alpha_at(t, step, 100) for t in (0, 9, 10, 50)] == [1.0, 1.0, 0.0, 0.0]
