"""KD and MLM losses against independent dense references and hand-computed values; alpha schedules.

The references never reuse the implementation's algebra: they take full teacher logits t and student logits s, form
softmax(t / tau) and softmax(s / tau) densely in float64, and sum them into buckets (one per distinct student id among
the teacher's kept top-k, plus the rest) by index sets. The implementation only sees what stage one caches: top-k
ids, their log-probabilities at tau = 1 and A_tau = logsumexp(log_softmax(t) / tau), in float32.
"""

from __future__ import annotations

import math

import pytest
import torch

from mdkd.pipeline.distill.config import AlphaConfig
from mdkd.pipeline.distill.losses import alpha_at, kd_loss, merge_duplicates, mlm_loss

TAUS = [1.0, 2.0, 4.0]


def dense_kd(student_logits, teacher_logits, tau):
    student = torch.log_softmax(student_logits / tau, dim=-1)
    teacher = torch.log_softmax(teacher_logits / tau, dim=-1)
    return tau**2 * (teacher.exp() * (teacher - student)).sum(dim=-1)


def weak_teacher(n, vocab, generator):
    """Zipf-like, flat-ish: rank r gets probability ∝ r^-0.5 (top-1 ≈ 0.04, top-8 ≈ 0.15 at V = 200), shuffled."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -0.5 * ranks.log() + 0.02 * torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(n)])
    return logits.gather(1, order)


def peaked_teacher(n, vocab, generator):
    return 4.0 * torch.randn(n, vocab, generator=generator, dtype=torch.float64)


def cache(teacher_logits, k, tau, mapping=None):
    """What stage one stores: top-k (teacher vocabulary) ids mapped into the student vocabulary, their tau = 1
    log-probabilities, and A_tau over the teacher's full vocabulary; float32 like the cache."""
    logp = torch.log_softmax(teacher_logits, dim=-1)
    values, top = logp.topk(k, dim=-1)
    ids = top if mapping is None else mapping[top]
    return top, ids, values.float(), torch.logsumexp(logp / tau, dim=-1).float()


def bucket_reference(student_logits, teacher_logits, top, mapping, tau, mode):
    """tau^2 * KL between the dense tempered distributions summed into buckets, per row (float64, differentiable)."""
    teacher_tau = torch.softmax(teacher_logits / tau, dim=-1)
    teacher_one = torch.softmax(teacher_logits, dim=-1)
    student_tau = torch.softmax(student_logits / tau, dim=-1)
    vocab_t, vocab_s = teacher_logits.shape[1], student_logits.shape[1]
    losses = []
    for n in range(teacher_logits.shape[0]):
        mapped = mapping[top[n]]
        buckets = list(dict.fromkeys(b for b in mapped.tolist() if b >= 0))
        if not buckets:
            losses.append(student_logits[n].sum() * 0.0)
            continue
        members = [top[n][mapped == b] for b in buckets]  # the teacher's top-k ids in each bucket
        q = student_tau[n, buckets]
        if mode == "rest":
            p = torch.stack([teacher_tau[n, m].sum() for m in members])
            covered_t = torch.zeros(vocab_t, dtype=torch.bool)
            covered_t[top[n][mapped >= 0]] = True
            covered_s = torch.zeros(vocab_s, dtype=torch.bool)
            covered_s[buckets] = True
            if (~covered_s).any():  # the rest bucket exists
                p = torch.cat([p, teacher_tau[n, ~covered_t].sum().reshape(1)])
                q = torch.cat([q, student_tau[n, ~covered_s].sum().reshape(1)])
        else:
            mass = torch.stack([teacher_one[n, m].sum() for m in members])
            p = (mass / mass.sum()) ** (1.0 / tau)
            p = p / p.sum()
        positive = p > 0
        losses.append(tau**2 * (p[positive] * (p[positive].log() - q[positive].log())).sum())
    return torch.stack(losses)


def loss_and_grad(fn, student_logits):
    leaf = student_logits.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    loss.sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("k", [1, 8, 60])
@pytest.mark.parametrize("make_teacher", [weak_teacher, peaked_teacher])
def test_rest_equals_dense_tempered_buckets(make_teacher, k, tau):
    generator = torch.Generator().manual_seed(k)
    vocab = 200
    teacher = make_teacher(6, vocab, generator)
    student = 2.0 * torch.randn(6, vocab, generator=generator, dtype=torch.float64)
    top, ids, values, partition = cache(teacher, k, tau)
    got, grad = loss_and_grad(lambda s: kd_loss(s, ids, values, tau, "rest", partition), student.float())
    identity = torch.arange(vocab)
    expected, expected_grad = loss_and_grad(lambda s: bucket_reference(s, teacher, top, identity, tau, "rest"), student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)


def test_weak_teacher_is_as_described():
    teacher = torch.softmax(weak_teacher(64, 200, torch.Generator().manual_seed(0)), dim=-1)
    top = teacher.topk(8, dim=-1).values
    assert 0.03 < top[:, 0].mean() < 0.05 and 0.13 < top.sum(-1).mean() < 0.18


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("make_teacher", [weak_teacher, peaked_teacher])
def test_full_vocabulary_top_k_equals_dense_kd(make_teacher, missing_mass, tau):
    generator = torch.Generator().manual_seed(3)
    teacher = make_teacher(7, 60, generator)
    student = torch.randn(7, 60, generator=generator, dtype=torch.float64)
    _, ids, values, partition = cache(teacher, 60, tau)
    got, grad = loss_and_grad(lambda s: kd_loss(s, ids, values, tau, missing_mass, partition), student.float())
    expected, expected_grad = loss_and_grad(lambda s: dense_kd(s, teacher, tau), student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(grad).all()


def duplicate_mapping(teacher, k, generator, vocab_s):
    """A teacher -> student map into [0, vocab_s - 10) (so the student always has a rest), arranged so that each
    row's top-k has two ids on one student id and one dropped id (-1); elsewhere -1 about 10 % of the time."""
    vocab_t = teacher.shape[1]
    mapping = torch.randint(0, vocab_s - 10, (vocab_t,), generator=generator)
    mapping[torch.rand(vocab_t, generator=generator) < 0.1] = -1
    top = teacher.topk(k, dim=-1).indices
    for n in range(teacher.shape[0]):
        first, second, third = top[n, 2 * n % k], top[n, (2 * n + 1) % k], top[n, (2 * n + 3) % k]
        mapping[third] = -1
        mapping[second] = mapping[first] if mapping[first] >= 0 else 5
        mapping[first] = mapping[second]
    return mapping


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("k", [8, 120])
def test_duplicate_and_dropped_ids_against_dense_buckets(missing_mass, tau, k):
    generator = torch.Generator().manual_seed(11)
    teacher = weak_teacher(4, 120, generator) if k == 8 else peaked_teacher(4, 120, generator)
    student = 2.0 * torch.randn(4, 80, generator=generator, dtype=torch.float64)
    mapping = duplicate_mapping(teacher, k, generator, 80)
    top, ids, values, partition = cache(teacher, k, tau, mapping)
    assert (ids == -1).any(dim=1).all()
    assert all(len(set(row.tolist()) - {-1}) < (row >= 0).sum() for row in ids)  # a duplicate in every row
    got, grad = loss_and_grad(lambda s: kd_loss(s, ids, values, tau, missing_mass, partition), student.float())
    expected, expected_grad = loss_and_grad(
        lambda s: bucket_reference(s, teacher, top, mapping, tau, missing_mass), student
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
def test_row_without_targets_gives_zero_loss_and_zero_finite_gradient(missing_mass):
    generator = torch.Generator().manual_seed(5)
    teacher = weak_teacher(3, 50, generator)
    student = torch.randn(3, 50, generator=generator)
    _, ids, values, partition = cache(teacher, 8, 2.0)
    ids[1] = -1  # e.g. a vocabulary cap dropped every id of this position
    values[1] = -torch.inf  # whatever the cache holds there must not matter
    partition[1] = torch.nan
    weights = torch.tensor([1.0, 0.0, 1.0])
    leaf = student.clone().requires_grad_(True)
    loss = kd_loss(leaf, ids, values, 2.0, missing_mass, partition)
    (loss * weights).sum().backward()
    assert loss[1].item() == 0.0 and torch.isfinite(loss).all()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[1] == 0).all()
    rows = [0, 2]
    others, others_grad = loss_and_grad(
        lambda s: kd_loss(s, ids[rows], values[rows], 2.0, missing_mass, partition[rows]), student[rows]
    )
    torch.testing.assert_close(loss[rows].detach(), others)
    torch.testing.assert_close(leaf.grad[rows], others_grad)
    # The same row with an unweighted sum: still zero and finite.
    leaf.grad = None
    kd_loss(leaf, ids, values, 2.0, missing_mass, partition).sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[1] == 0).all()


@pytest.mark.parametrize("tau", TAUS)
def test_student_rest_that_underflows_float32_is_finite_and_exact(tau):
    # The student puts 200 / tau more log-mass on the teacher's top-8: its rest (~e^-200/tau * 42) underflows
    # float32 at tau = 1; 1 - sum would give log 0 = -inf. The masked logsumexp keeps it finite and exact.
    generator = torch.Generator().manual_seed(7)
    teacher = peaked_teacher(3, 50, generator)
    top, ids, values, partition = cache(teacher, 8, tau)
    student = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    student.scatter_add_(1, top, torch.full(top.shape, 200.0, dtype=torch.float64))
    got, grad = loss_and_grad(lambda s: kd_loss(s, ids, values, tau, "rest", partition), student.float())
    expected, expected_grad = loss_and_grad(
        lambda s: bucket_reference(s, teacher, top, torch.arange(50), tau, "rest"), student
    )
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shift", [1e-6, -1e-6])
def test_teacher_rest_of_rounding_size_is_harmless(shift):
    # k = V with a partition that leaves a float32-rounding "rest" (or overshoots 1): still the dense loss.
    generator = torch.Generator().manual_seed(9)
    teacher, student = peaked_teacher(4, 30, generator), torch.randn(4, 30, generator=generator, dtype=torch.float64)
    _, ids, values, partition = cache(teacher, 30, 2.0)
    got, grad = loss_and_grad(lambda s: kd_loss(s, ids, values, 2.0, "rest", partition + shift), student.float())
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(got.double(), dense_kd(student, teacher, 2.0), rtol=1e-4, atol=1e-5)


def test_hand_computed_rest_bucket():
    # Teacher keeps 0.6 on token 2 and 0.4 elsewhere; the student puts softmax([1, 1, 2]) there; tau = 1, A_1 = 0.
    student = torch.tensor([[1.0, 1.0, 2.0]])
    s = torch.softmax(student[0], dim=0)
    expected = 0.6 * math.log(0.6 / s[2]) + 0.4 * math.log(0.4 / (1 - s[2]))
    got = kd_loss(student, torch.tensor([[2]]), torch.tensor([[math.log(0.6)]]), 1.0, "rest", torch.zeros(1))
    # The loss is computed in float32 and this KL (~1e-3) is a difference of terms ~0.5: compare absolutely.
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_tempered_rest_bucket():
    # Teacher distribution (0.6, 0.3, 0.1), top-1 = token 0, tau = 2: tempered ∝ sqrt(p), so the top-1 gets
    # sqrt(.6) / (sqrt(.6) + sqrt(.3) + sqrt(.1)) ≈ 0.4727 and the rest 0.5273 (the old rest mode said
    # sqrt(.6) / (sqrt(.6) + sqrt(.4)) ≈ 0.5505).
    roots = [math.sqrt(0.6), math.sqrt(0.3), math.sqrt(0.1)]
    top, rest = roots[0] / sum(roots), (roots[1] + roots[2]) / sum(roots)
    student = torch.tensor([[0.5, -1.0, 2.0]])
    s = torch.softmax(student[0] / 2.0, dim=0)
    expected = 4.0 * (top * math.log(top / s[0]) + rest * math.log(rest / (s[1] + s[2])))
    got = kd_loss(
        student, torch.tensor([[0]]), torch.tensor([[math.log(0.6)]]), 2.0, "rest", torch.tensor([math.log(sum(roots))])
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_rest_needs_the_log_partition_and_modes_are_checked():
    student, ids, logprobs = torch.zeros(2, 5), torch.tensor([[0], [1]]), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="teacher_log_partition"):
        kd_loss(student, ids, logprobs, 2.0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(student, ids, logprobs, 2.0, "rest", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="missing_mass"):
        kd_loss(student, ids, logprobs, 2.0, "tail", torch.zeros(2))


def test_half_precision_student_is_computed_in_float32():
    teacher = torch.randn(3, 20)
    _, ids, values, partition = cache(teacher.double(), 5, 2.0)
    half = kd_loss(teacher.bfloat16(), ids, values, 2.0, "rest", partition)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, kd_loss(teacher.bfloat16().float(), ids, values, 2.0, "rest", partition))


def test_hand_computed_renormalised_top_2():
    # Teacher top-2 probabilities 0.5 and 0.25 -> renormalised 2/3, 1/3; at tau = 2: sqrt -> ∝ 0.8165, 0.5774.
    student = torch.tensor([[0.0, math.log(2.0), 0.0]])
    ids = torch.tensor([[1, 0]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    q = torch.tensor([math.sqrt(2 / 3), math.sqrt(1 / 3)])
    q = q / q.sum()
    s = torch.softmax(student[0] / 2.0, dim=0)[[1, 0]]
    expected = 4.0 * (q * (q.log() - s.log())).sum()
    assert kd_loss(student, ids, logprobs, 2.0, "renormalize").item() == pytest.approx(expected.item(), rel=1e-6)


def test_renormalize_ids_mapped_to_one_student_token_are_summed_and_dropped_ids_removed():
    torch.manual_seed(1)
    student = torch.randn(2, 10)
    logprobs = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1]]))
    with_duplicates = torch.tensor([[3, 5, 3, -1], [7, 7, 7, 2]])
    merged_ids = torch.tensor([[3, 5, -1, -1], [7, 2, -1, -1]])
    merged_logprobs = torch.log(torch.tensor([[0.6, 0.3, 1.0, 1.0], [0.9, 0.1, 1.0, 1.0]]))
    torch.testing.assert_close(
        kd_loss(student, with_duplicates, logprobs, 2.0, "renormalize"),
        kd_loss(student, merged_ids, merged_logprobs, 2.0, "renormalize"),
    )
    ids, probs = merge_duplicates(with_duplicates, logprobs.exp())
    assert ids.tolist() == [[3, 5, -1, -1], [7, -1, -1, 2]]
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.3, 0.0, 0.0], [0.9, 0.0, 0.0, 0.1]]))


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
def test_kd_is_zero_when_the_student_matches_and_positive_otherwise(missing_mass):
    teacher = torch.randn(4, 12)
    _, ids, values, partition = cache(teacher.double(), 12, 2.0)
    assert kd_loss(teacher, ids, values, 2.0, missing_mass, partition).abs().max() < 1e-5
    assert (kd_loss(torch.zeros(4, 12), ids, values, 2.0, missing_mass, partition) > 0).all()
    _, ids, values, partition = cache(teacher.double(), 4, 2.0)
    assert (kd_loss(torch.zeros(4, 12), ids, values, 2.0, missing_mass, partition) > 0).all()


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


def test_merging_duplicates_matches_a_loop_over_each_row():
    """The sort-based merge (O(k log k) per row, so that k can be a whole vocabulary) against the obvious loop: the
    first column of each id keeps the sum of its probabilities, later ones become -1 with probability 0."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(1, 12, (1,), generator=generator))
        ids = torch.randint(-1, 6, (5, k), generator=generator)
        probs = torch.rand(5, k, generator=generator, dtype=torch.float64)
        expected_ids, expected = ids.clone(), torch.zeros_like(probs)
        for row in range(5):
            first: dict[int, int] = {}
            for column, token in enumerate(ids[row].tolist()):
                if token >= 0 and token not in first:
                    first[token] = column
                if token < 0 or first[token] != column:
                    expected_ids[row, column] = -1
                if token >= 0:
                    expected[row, first[token]] += probs[row, column]
        merged_ids, merged = merge_duplicates(ids, probs)
        assert torch.equal(merged_ids, expected_ids)
        torch.testing.assert_close(merged, expected)
