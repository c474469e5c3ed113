"""An independent float64 reference for `kd_loss`, built from the specification, not from the implementation.

Everything here starts from raw teacher logits over teacher ids, as stage one does: log-softmax over the
tokenizer's ids only (a wider head's extra rows get no mass), twins' probabilities summed into one probability per
canonical token ("class"), top-k classes cached with their tau = 1 log-probabilities and A_tau = logsumexp(log p / tau)
over all classes. The DENSE target is the tempered class distribution pushed to student ids, 0 outside the teacher's
support, and the dense KD loss is tau^2 * KL(target || softmax(student / tau)) over the whole student vocabulary.
The bucketed references ("support" without a tail, "rest") are computed from those dense distributions, knowing
which ids are cached. The sampled tail is drawn here with torch.multinomial and checked statistically: averaged
over many independent draws, the loss and its gradient must match the dense loss and gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from mdkd.pipeline.distill.losses import TailSample, kd_loss

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------------------------------
# The reference set-up: a teacher over ids, its classes, and the student vocabulary.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A teacher at N positions, reduced to classes and placed in a student vocabulary of size `vocab`.

    logp [N, C]: log p over classes at tau = 1 (twins summed, head padding excluded); to_student [C]: the student id
    of each class (injective); support [N, V]: the student ids of the classes."""

    logp: torch.Tensor
    to_student: torch.Tensor
    vocab: int

    @property
    def classes(self) -> int:
        return self.logp.shape[1]

    @property
    def support(self) -> torch.Tensor:
        mask = torch.zeros(self.logp.shape[0], self.vocab, dtype=torch.bool)
        mask[:, self.to_student] = True
        return mask

    def log_partition(self, tau: float) -> torch.Tensor:
        """A_tau = logsumexp over ALL classes of log p / tau, [N]."""
        return torch.logsumexp(self.logp / tau, dim=1)

    def dense_log_target(self, tau: float) -> torch.Tensor:
        """[N, V] log of the dense target: p pushed to student ids (-inf elsewhere), then tempered over the student
        vocabulary: t_tau ∝ t_1^(1/tau), which is 0 wherever t_1 is 0."""
        log_t1 = torch.full((self.logp.shape[0], self.vocab), -math.inf, dtype=DTYPE)
        log_t1[:, self.to_student] = self.logp
        return torch.log_softmax(log_t1 / tau, dim=1)

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache: (student ids [N, k], log p at tau = 1 [N, k] descending, class indices [N, k])."""
        values, classes = self.logp.topk(k, dim=1)
        return self.to_student[classes], values, classes


def teacher_from_logits(
    raw: torch.Tensor, tokenizer_size: int, class_of_id: torch.Tensor, to_student: torch.Tensor, vocab: int
) -> Teacher:
    """Stage one, from raw head logits [N, H >= tokenizer_size]: log-softmax over the tokenizer's ids only, then the
    probabilities of ids sharing a canonical token (class_of_id [tokenizer_size]) summed."""
    id_probs = torch.softmax(raw[:, :tokenizer_size].to(DTYPE), dim=1)
    classes = int(class_of_id.max()) + 1
    class_probs = torch.zeros(raw.shape[0], classes, dtype=DTYPE).index_add_(1, class_of_id, id_probs)
    assert torch.allclose(class_probs.sum(1), torch.ones(raw.shape[0], dtype=DTYPE))
    return Teacher(class_probs.log(), to_student, vocab)


def plain_teacher(n: int, classes: int, vocab: int, scale: float, seed: int) -> Teacher:
    """A teacher without twins or padding, its classes at random student ids, `vocab - classes` extra tokens."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, classes, generator=gen, dtype=DTYPE) * scale
    to_student = torch.randperm(vocab, generator=gen)[:classes]
    return teacher_from_logits(raw, classes, torch.arange(classes), to_student, vocab)


def student_logits(n: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=gen, dtype=DTYPE) * scale


# --------------------------------------------------------------------------------------------------------------------
# Reference losses (float64, dense).
# --------------------------------------------------------------------------------------------------------------------


def dense_kd(student: torch.Tensor, teacher: Teacher, tau: float) -> torch.Tensor:
    """tau^2 * KL(dense target || softmax(student / tau)) over the whole student vocabulary, [N]."""
    log_t = teacher.dense_log_target(tau)
    log_q = torch.log_softmax(student / tau, dim=1)
    support = torch.isfinite(log_t)
    safe_log_t = torch.where(support, log_t, torch.zeros_like(log_t))
    terms = torch.where(support, safe_log_t.exp() * (safe_log_t - log_q), torch.zeros_like(log_q))
    return tau**2 * terms.sum(1)


def _cached_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    mask = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    mask[rows[ids >= 0], ids[ids >= 0]] = True
    return mask


def _bucket_term(mass_p: torch.Tensor, mass_q: torch.Tensor) -> torch.Tensor:
    """P log(P / Q), 0 where P = 0 (with a gradient of 0 there, not NaN)."""
    positive = mass_p > 0
    safe_p = torch.where(positive, mass_p, torch.ones_like(mass_p))
    safe_q = torch.where(positive, mass_q, torch.ones_like(mass_q))
    return torch.where(positive, safe_p * (safe_p.log() - safe_q.log()), torch.zeros_like(mass_p))


def bucketed_kd(student: torch.Tensor, teacher: Teacher, tau: float, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """tau^2 * [sum_cached t log(t / q) + P_R log(P_R / Q_R)], from the dense distributions.

    support: R = support minus the cached ids; rest: R = the whole student vocabulary minus the cached ids."""
    log_t = teacher.dense_log_target(tau)
    log_q = torch.log_softmax(student / tau, dim=1)
    cached = _cached_mask(ids, teacher.vocab)
    t = log_t.exp()
    q = log_q.exp()
    safe_log_t = torch.where(cached, log_t, torch.zeros_like(log_t))
    cached_terms = torch.where(cached, t * (safe_log_t - log_q), torch.zeros_like(log_q)).sum(1)
    rest = (teacher.support & ~cached) if mode == "support" else ~cached
    mass_p = torch.where(rest, t, torch.zeros_like(t)).sum(1)
    mass_q = torch.where(rest, q, torch.zeros_like(q)).sum(1)
    return tau**2 * (cached_terms + _bucket_term(mass_p, mass_q))


def value_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(student) [N] and the gradient of its sum (row n's gradient is that of loss n: rows are independent)."""
    leaf = student.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    return out.detach(), grad


def kd_support(teacher: Teacher, k: int, tau: float, tail: TailSample | None = None):
    ids, logprobs, _ = teacher.top_k(k)
    return lambda s: kd_loss(s, ids, logprobs, tau, "support", teacher.log_partition(tau), teacher.support, tail)


def kd_rest(teacher: Teacher, k: int, tau: float):
    ids, logprobs, _ = teacher.top_k(k)
    return lambda s: kd_loss(s, ids, logprobs, tau, "rest", teacher.log_partition(tau))


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-10, what: str = ""):
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: max excess at {worst}: got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r}"
    )


# --------------------------------------------------------------------------------------------------------------------
# 1. "support" without a tail: bucketed KL at k < C, dense KL at k = C.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [3, 20])
def test_support_matches_bucketed_and_dense_reference(tau, k):
    """'support' (no tail) = tau^2 [sum_cached t log t/q + P_R log P_R/Q_R], R = support minus cached, in value and
    gradient; at k = C (every class cached) that is the dense KD loss, and below it a strict lower bound (DPI)."""
    teacher = plain_teacher(n=6, classes=20, vocab=29, scale=2.0, seed=1)
    student = student_logits(6, 29, scale=1.5, seed=2)
    ids = teacher.top_k(k)[0]
    got, got_grad = value_and_grad(kd_support(teacher, k, tau), student)
    want, want_grad = value_and_grad(lambda s: bucketed_kd(s, teacher, tau, ids, "support"), student)
    dense, dense_grad = value_and_grad(lambda s: dense_kd(s, teacher, tau), student)
    assert got.dtype == DTYPE
    assert_close(got, want, what="loss vs bucketed reference")
    assert_close(got_grad, want_grad, atol=1e-10, what="gradient vs bucketed reference")
    if k == teacher.classes:
        assert_close(got, dense, what="loss vs dense at k = C")
        assert_close(got_grad, dense_grad, what="gradient vs dense at k = C")
    else:
        # the reference is a lower bound, and not a trivial one here (so the two cases are distinguishable)
        assert bool((want < dense - 1e-3).all())


def test_support_mixed_teachers_in_one_batch():
    """Rows from two teachers with different supports (different classes, different student ids) in one call: each
    row's loss and gradient follow its own support; the smaller teacher's cache is padded with -1 ids (logprob
    -inf), which must act as 'no token' (its rows with all its C2 classes cached then equal the dense loss)."""
    vocab, tau, k = 26, 2.0, 12
    big = plain_teacher(n=3, classes=12, vocab=vocab, scale=2.0, seed=3)
    small = plain_teacher(n=3, classes=7, vocab=vocab, scale=2.0, seed=4)
    student = student_logits(6, vocab, scale=1.0, seed=5)
    ids_big, lp_big, _ = big.top_k(k)
    ids_small, lp_small, _ = small.top_k(small.classes)
    pad = k - small.classes
    ids_small = torch.cat([ids_small, torch.full((3, pad), -1)], dim=1)
    lp_small = torch.cat([lp_small, torch.full((3, pad), -math.inf, dtype=DTYPE)], dim=1)
    ids = torch.cat([ids_big, ids_small])
    logprobs = torch.cat([lp_big, lp_small])
    partition = torch.cat([big.log_partition(tau), small.log_partition(tau)])
    support = torch.cat([big.support, small.support])
    got, got_grad = value_and_grad(lambda s: kd_loss(s, ids, logprobs, tau, "support", partition, support), student)
    want_big, grad_big = value_and_grad(lambda s: dense_kd(s, big, tau), student[:3])
    want_small, grad_small = value_and_grad(lambda s: dense_kd(s, small, tau), student[3:])
    assert_close(got, torch.cat([want_big, want_small]), what="mixed-teacher loss")
    assert_close(got_grad, torch.cat([grad_big, grad_small]), what="mixed-teacher gradient")


# --------------------------------------------------------------------------------------------------------------------
# 2. Twins and 3. a padded head.
# --------------------------------------------------------------------------------------------------------------------


def twin_teacher(pad_rows: int = 0, pad_logit: float = 0.0) -> tuple[Teacher, torch.Tensor, torch.Tensor]:
    """A teacher with 36 ids over 26 classes: class 0 has ids {0, 26, 27} each individually below the singleton
    classes 1, 2 and 4 but above them in sum; class 3 has {3, 28}; classes 15..19 have tail twins {15+i, 29+i} (and
    class 20 has {20, 34, 35}). Returns (teacher, raw logits [N, 36 + pad_rows], class_of_id)."""
    n, tokenizer_size, classes, vocab = 4, 36, 26, 33
    class_of_id = torch.cat(
        [torch.arange(classes), torch.tensor([0, 0, 3, 15, 16, 17, 18, 19, 20, 20])]
    )  # ids 26..35 are twins
    gen = torch.Generator().manual_seed(7)
    raw = torch.randn(n, tokenizer_size, generator=gen, dtype=DTYPE) * 0.5
    raw[:, [0, 26, 27]] = 2.0  # class 0: three ids, each below ids 1 and 2
    raw[:, 1], raw[:, 2], raw[:, 4] = 2.7, 2.6, 2.5  # singletons: the id-level top-3 is {1, 2, 4}
    raw[:, [3, 28]] = 1.8
    raw[:, 15:21] -= 1.0
    raw = torch.cat([raw, torch.full((n, pad_rows), pad_logit, dtype=DTYPE)], dim=1)
    to_student = torch.randperm(vocab, generator=gen)[:classes]
    return teacher_from_logits(raw, tokenizer_size, class_of_id, to_student, vocab), raw, class_of_id


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_twins_inside_and_outside_top_k(tau):
    """Twins summed at tau = 1 before tempering and before the top-k: the loss matches the dense KD loss built from
    the raw id logits at k = C, and the bucketed reference at k = 3 (top-3 = classes {0, 1, 2}: class 0 only by its
    summed twins; class 3 and classes 15..20 are twins outside it). A reference that tempered ids before summing
    twins would differ, so the check is sensitive to where the twins are summed."""
    teacher, raw, class_of_id = twin_teacher()
    student = student_logits(4, teacher.vocab, scale=1.0, seed=8)
    k = 3
    _, _, top_classes = teacher.top_k(k)
    assert set(top_classes[0].tolist()) == {0, 1, 2}
    id_top = raw[0, :36].topk(k).indices.tolist()
    assert 0 not in id_top and 26 not in id_top and 27 not in id_top  # class 0 enters by its sum only
    ids = teacher.top_k(k)[0]
    got, got_grad = value_and_grad(kd_support(teacher, k, tau), student)
    want, want_grad = value_and_grad(lambda s: bucketed_kd(s, teacher, tau, ids, "support"), student)
    assert_close(got, want, what="twins, k = 3")
    assert_close(got_grad, want_grad, what="twins, k = 3, gradient")
    full, full_grad = value_and_grad(kd_support(teacher, teacher.classes, tau), student)
    dense, dense_grad = value_and_grad(lambda s: dense_kd(s, teacher, tau), student)
    assert_close(full, dense, what="twins, k = C")
    assert_close(full_grad, dense_grad, what="twins, k = C, gradient")
    if tau != 1.0:  # sensitivity: tempering the twins' ids separately gives a different partition and loss
        wrong_partition = torch.logsumexp(torch.log_softmax(raw[:, :36], 1) / tau, dim=1)
        assert bool(((wrong_partition - teacher.log_partition(tau)).abs() > 1e-3).all())


def test_padded_head_rows_get_no_mass():
    """A head wider than its tokenizer: 7 extra rows with large logits (+6) are not tokens; stage one's log-softmax
    (and so the reference) runs over the tokenizer's 36 ids only. The loss (with the cache built that way) matches
    the dense reference at k = C and the bucketed one at k = 4; including the rows would change p a lot."""
    teacher, raw, class_of_id = twin_teacher(pad_rows=7, pad_logit=6.0)
    assert raw.shape[1] == 43
    unpadded, _, _ = twin_teacher()
    assert torch.allclose(teacher.logp, unpadded.logp)  # the padding does not exist as classes
    with_rows = torch.log_softmax(raw, 1)[:, :36].exp().sum(1)
    assert bool((with_rows < 0.2).all())  # a reference that forgot the padding would be far off
    student = student_logits(4, teacher.vocab, scale=1.0, seed=9)
    tau = 2.0
    got, got_grad = value_and_grad(kd_support(teacher, teacher.classes, tau), student)
    dense, dense_grad = value_and_grad(lambda s: dense_kd(s, teacher, tau), student)
    assert_close(got, dense, what="padded head, k = C")
    assert_close(got_grad, dense_grad, what="padded head, k = C, gradient")
    ids = teacher.top_k(4)[0]
    got4 = kd_support(teacher, 4, tau)(student)
    assert_close(got4, bucketed_kd(student, teacher, tau, ids, "support"), what="padded head, k = 4")


# --------------------------------------------------------------------------------------------------------------------
# 4. Tokens outside the support; the "rest" mode.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_rest_matches_its_reference(tau):
    """'rest' = tau^2 [sum_cached t log t/q + P_R log(P_R / (1 - sum_cached q))], in value and gradient."""
    teacher = plain_teacher(n=5, classes=15, vocab=24, scale=2.0, seed=10)
    student = student_logits(5, 24, scale=1.5, seed=11)
    ids = teacher.top_k(4)[0]
    got, got_grad = value_and_grad(kd_rest(teacher, 4, tau), student)
    want, want_grad = value_and_grad(lambda s: bucketed_kd(s, teacher, tau, ids, "rest"), student)
    assert_close(got, want, what="rest loss")
    assert_close(got_grad, want_grad, what="rest gradient")


def test_mass_outside_the_support_is_taught_zero():
    """Raising the student's logits on the tokens the teacher does not have raises the 'support' loss (at k = C: it
    IS the dense KL, which grows), while 'rest' only sees those tokens through its single rest bucket: permuting the
    student's logits among the non-cached tokens (support and extra alike) leaves 'rest' unchanged but changes
    'support'. A student that matches the cached tokens and puts the rest of the mass outside the support has
    'rest' loss 0 but 'support' loss P_R log(P_R / Q_R)."""
    teacher = plain_teacher(n=3, classes=12, vocab=20, scale=2.0, seed=12)
    base = student_logits(3, 20, scale=1.0, seed=13)
    extra = ~teacher.support
    tau, k = 1.0, 4
    losses = []
    for boost in [0.0, 2.0, 4.0, 8.0]:
        student = base + boost * extra.to(DTYPE)
        full = kd_support(teacher, teacher.classes, tau)(student)
        assert_close(full, dense_kd(student, teacher, tau), what=f"support at k = C, boost {boost}")
        losses.append(full)
    assert all(bool((b > a + 1e-3).all()) for a, b in pairwise(losses))

    # A student that matches the teacher on the k cached tokens and puts the teacher's rest mass P_R almost all
    # (1 - 1e-3) on the extra tokens: 'rest' is blind to that (its loss is 0), 'support' charges P_R log(1 / 1e-3).
    ids = teacher.top_k(k)[0]
    cached = _cached_mask(ids, teacher.vocab)
    t = teacher.dense_log_target(tau).exp()
    mass_rest = 1 - torch.where(cached, t, torch.zeros_like(t)).sum(1, keepdim=True)
    inside = teacher.support & ~cached
    eps = 1e-3
    q = torch.where(cached, t, torch.zeros_like(t))
    q = q + extra * mass_rest * (1 - eps) / extra.sum(1, keepdim=True)
    q = q + inside * mass_rest * eps / inside.sum(1, keepdim=True)
    student = q.log() * tau
    outside = torch.where(extra, q, torch.zeros_like(q)).sum(1)
    assert bool((outside > 0.1).all())
    support_k = kd_support(teacher, k, tau)(student)
    rest_k = kd_rest(teacher, k, tau)(student)
    assert_close(support_k, bucketed_kd(student, teacher, tau, ids, "support"), what="support, k = 4")
    assert_close(rest_k, bucketed_kd(student, teacher, tau, ids, "rest"), what="rest, k = 4")
    assert bool((rest_k.abs() < 1e-9).all()), rest_k
    assert_close(support_k, tau**2 * mass_rest[:, 0] * math.log(1 / eps), rtol=1e-9, what="support's charge")
    assert bool((support_k > 0.5).all())
    student = student + 3.0 * extra.to(DTYPE)  # any q-mass moved outside the support: rest bucket still free

    # Permute each row's logits among its non-cached tokens: rest's buckets are unchanged, support's are not.
    support_k = kd_support(teacher, k, tau)(student)
    rest_k = kd_rest(teacher, k, tau)(student)
    shuffled = student.clone()
    gen = torch.Generator().manual_seed(14)
    for row in range(3):
        free = (~cached[row]).nonzero().flatten()
        shuffled[row, free] = student[row, free[torch.randperm(len(free), generator=gen)]]
    assert_close(kd_rest(teacher, k, tau)(shuffled), rest_k, rtol=1e-9, what="rest under a shuffle of the rest")
    moved = kd_support(teacher, k, tau)(shuffled)
    assert_close(moved, bucketed_kd(shuffled, teacher, tau, ids, "support"), what="support after shuffle")
    assert bool(((moved - support_k).abs() > 1e-3).all())


# --------------------------------------------------------------------------------------------------------------------
# 5. The sampled tail.
# --------------------------------------------------------------------------------------------------------------------


def draw_tail(teacher: Teacher, k: int, tau_s: float, draws: int, gen: torch.Generator) -> TailSample:
    """`draws` classes per row, with replacement, from p_{tau_s} restricted to the classes outside the cached top-k
    (renormalised there), as distinct student ids with counts (padded to width `draws` with -1 / 0)."""
    n, classes = teacher.logp.shape
    partition = teacher.log_partition(tau_s)
    weights = (teacher.logp / tau_s - partition.unsqueeze(1)).exp()
    weights = weights.scatter(1, teacher.top_k(k)[2], 0.0)
    drawn = torch.multinomial(weights, draws, replacement=True, generator=gen)  # [N, draws] class indices
    counts = torch.zeros(n, classes, dtype=torch.long).scatter_add_(1, drawn, torch.ones_like(drawn))
    width = min(draws, classes)
    counts, picked = counts.topk(width, dim=1)
    present = counts > 0
    ids = torch.where(present, teacher.to_student[picked], torch.full_like(picked, -1))
    logprobs = torch.where(present, teacher.logp.gather(1, picked), torch.zeros(n, width, dtype=DTYPE))
    if width < draws:
        ids = torch.cat([ids, torch.full((n, draws - width), -1)], dim=1)
        counts = torch.cat([counts, torch.zeros(n, draws - width, dtype=torch.long)], dim=1)
        logprobs = torch.cat([logprobs, torch.zeros(n, draws - width, dtype=DTYPE)], dim=1)
    assert bool((counts.sum(1) == draws).all())
    return TailSample(ids, counts, logprobs, tau_s, partition)


def replicate(teacher: Teacher, rows: int) -> Teacher:
    """The teacher's first position repeated `rows` times (one independent tail draw per row)."""
    return Teacher(teacher.logp[:1].expand(rows, -1).clone(), teacher.to_student, teacher.vocab)


def weak_teacher() -> Teacher:
    """150 classes in a 180-token student vocabulary, flat logits: its top-4 hold ~15 % of the mass."""
    return plain_teacher(n=1, classes=150, vocab=180, scale=1.0, seed=20)


def tail_estimates(teacher: Teacher, student: torch.Tensor, k: int, tau: float, tau_s: float, draws: int, rows: int):
    """kd_loss with `rows` independent tails over one position: per-draw losses [rows] and gradients [rows, V]."""
    many = replicate(teacher, rows)
    tail = draw_tail(many, k, tau_s, draws, torch.Generator().manual_seed(int(1000 * tau + 100 * tau_s + draws)))
    return value_and_grad(kd_support(many, k, tau, tail), student[:1].expand(rows, -1))


@pytest.mark.parametrize(("tau", "tau_s"), [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (1.0, 2.0)])
def test_sampled_tail_is_unbiased_for_the_dense_loss_and_gradient(tau, tau_s):
    """With a sampled tail (tau_s = the draws' temperature; importance weights when tau != tau_s), the mean of
    kd_loss over R independent tails equals the dense KD loss, and the mean gradient the dense gradient, within
    5 standard errors (estimated from the R draws). Weak teacher, k = 4 << V = 180, 30 extra student tokens."""
    teacher = weak_teacher()
    k, rows, draws = 4, 4000, 8
    top_mass = teacher.logp.topk(k).values.exp().sum()
    assert 0.10 < float(top_mass) < 0.20
    student = student_logits(1, teacher.vocab, scale=1.0, seed=21)
    dense, dense_grad = value_and_grad(lambda s: dense_kd(s, teacher, tau), student)
    no_tail = kd_support(teacher, k, tau)(student)
    losses, grads = tail_estimates(teacher, student, k, tau, tau_s, draws, rows)
    assert bool(torch.isfinite(losses).all()) and bool(torch.isfinite(grads).all())

    mean, se = losses.mean(), losses.std() / math.sqrt(rows)
    assert float(dense - no_tail) > 20 * float(se)  # the tail's term is resolvable, so a missing one would fail
    assert abs(float(mean - dense)) < 5 * float(se) + 1e-9, (
        f"tau={tau} tau_s={tau_s}: mean {mean.item():.6f} dense {dense.item():.6f} se {se.item():.2e} "
        f"(no tail: {no_tail.item():.6f})"
    )
    grad_mean, grad_se = grads.mean(0), grads.std(0) / math.sqrt(rows)
    excess = (grad_mean - dense_grad[0]).abs() - (5 * grad_se + 1e-9)
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"gradient[{worst}]: mean {grad_mean[worst].item():.3e} dense {dense_grad[0, worst].item():.3e} "
        f"se {grad_se[worst].item():.2e}"
    )


@pytest.mark.parametrize(("tau", "tau_s"), [(1.0, 1.0), (2.0, 1.0)])
def test_sampled_tail_error_shrinks_with_draws(tau, tau_s):
    """The estimate from M draws is a mean of M i.i.d. terms: its root-mean-square error against the dense loss falls
    as 1/sqrt(M) (4 -> 64 draws: about a quarter), which also fails if there is a bias that does not vanish."""
    teacher = weak_teacher()
    student = student_logits(1, teacher.vocab, scale=1.0, seed=22)
    dense = dense_kd(student, teacher, tau)
    rms = {}
    for draws in (4, 64):
        losses, _ = tail_estimates(teacher, student, 4, tau, tau_s, draws, 2000)
        rms[draws] = float(((losses - dense) ** 2).mean().sqrt())
    ratio = rms[64] / rms[4]
    assert 0.17 < ratio < 0.35, f"rms error 4 draws {rms[4]:.3e}, 64 draws {rms[64]:.3e}, ratio {ratio:.3f}"


def test_sampled_tail_with_a_strong_teacher_and_several_positions():
    """A sharper teacher (top-5 holding most of the mass), several distinct positions per call with one tail each,
    tau = 2 over draws at tau_s = 1: the per-position means over R tails match each position's dense loss."""
    base = plain_teacher(n=3, classes=60, vocab=70, scale=3.0, seed=23)
    student = student_logits(3, 70, scale=2.0, seed=24)
    tau, tau_s, k, rows, draws = 2.0, 1.0, 5, 1500, 16
    many = Teacher(base.logp.repeat_interleave(rows, 0), base.to_student, base.vocab)
    tail = draw_tail(many, k, tau_s, draws, torch.Generator().manual_seed(25))
    losses, _ = value_and_grad(kd_support(many, k, tau, tail), student.repeat_interleave(rows, 0))
    losses = losses.view(3, rows)
    dense = dense_kd(student, base, tau)
    se = losses.std(1) / math.sqrt(rows)
    assert bool(((losses.mean(1) - dense).abs() < 5 * se + 1e-9).all()), (losses.mean(1), dense, se)


def test_tail_estimator_on_one_fixed_draw():
    """The docstring's estimator on one fixed draw set, computed by hand: bucketed KL plus
    P_R * (1/M) sum_j c_j w_j [log(t_j / P_R) - log(q_j / Q_R)], w_j = (t_j / P_R) / (t^s_j / P^s_R) (t^s: the
    teacher at the draws' temperature). Pins the exact form (e.g. a self-normalised weighting would fail here)."""
    teacher = plain_teacher(n=2, classes=30, vocab=36, scale=1.5, seed=26)
    student = student_logits(2, 36, scale=1.0, seed=27)
    tau, tau_s, k, draws = 2.0, 1.0, 3, 5
    tail = draw_tail(teacher, k, tau_s, draws, torch.Generator().manual_seed(28))
    ids = teacher.top_k(k)[0]

    def by_hand(s: torch.Tensor) -> torch.Tensor:
        log_t, log_ts = teacher.dense_log_target(tau), teacher.dense_log_target(tau_s)
        log_q = torch.log_softmax(s / tau, dim=1)
        rest = teacher.support & ~_cached_mask(ids, teacher.vocab)
        mass = torch.where(rest, log_t.exp(), torch.zeros_like(log_q)).sum(1, keepdim=True)
        mass_s = torch.where(rest, log_ts.exp(), torch.zeros_like(log_q)).sum(1, keepdim=True)
        mass_q = torch.where(rest, log_q.exp(), torch.zeros_like(log_q)).sum(1, keepdim=True)
        j = tail.ids.clamp(min=0)
        c = tail.counts.to(DTYPE)
        weight = (log_t.gather(1, j) - mass.log()).exp() / (log_ts.gather(1, j) - mass_s.log()).exp()
        term = (log_t.gather(1, j) - mass.log()) - (log_q.gather(1, j) - mass_q.log())
        inner = (c * weight * term).sum(1) / c.sum(1)
        return bucketed_kd(s, teacher, tau, ids, "support") + tau**2 * mass[:, 0] * inner

    got, got_grad = value_and_grad(kd_support(teacher, k, tau, tail), student)
    want, want_grad = value_and_grad(by_hand, student)
    assert_close(got, want, what="fixed-draw tail estimate")
    assert_close(got_grad, want_grad, what="fixed-draw tail gradient")


# --------------------------------------------------------------------------------------------------------------------
# 6. NaN safety.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [-math.inf, 0.0, -1e4])
@pytest.mark.parametrize("mode", ["support", "rest", "renormalize", "support+tail"])
def test_row_without_kept_ids_gives_zero_loss_and_gradient(mode, fill):
    """A position whose teacher ids are all -1 (whatever its logprobs hold: -inf, 0, very negative) contributes loss
    0 and gradient 0 exactly, in every mode, and does not disturb the other rows (which match their reference)."""
    teacher = plain_teacher(n=3, classes=10, vocab=14, scale=2.0, seed=30)
    student = student_logits(3, 14, scale=1.0, seed=31)
    student[1, :3] = torch.tensor([50.0, -50.0, 49.0], dtype=DTYPE)
    tau, k = 2.0, 3
    ids, logprobs, _ = teacher.top_k(k)
    ids[1] = -1
    logprobs[1] = fill
    partition = teacher.log_partition(tau)
    tail = None
    if mode == "support+tail":
        tail = draw_tail(teacher, k, 1.0, 4, torch.Generator().manual_seed(32))
        tail = TailSample(
            tail.ids.index_fill(0, torch.tensor([1]), -1),
            tail.counts.index_fill(0, torch.tensor([1]), 0),
            tail.logprobs.index_fill(0, torch.tensor([1]), fill),
            tail.temperature,
            tail.log_partition,
        )
    missing = "support" if mode == "support+tail" else mode
    kwargs = {"support": teacher.support} if missing == "support" else {}

    got, grad = value_and_grad(
        lambda s: kd_loss(s, ids, logprobs, tau, missing, partition, tail=tail, **kwargs), student
    )
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(grad).all())
    assert got[1].item() == 0.0
    assert bool((grad[1] == 0).all())
    if mode in ("support", "rest"):
        kept = torch.tensor([0, 2])
        sub = Teacher(teacher.logp[kept], teacher.to_student, teacher.vocab)
        assert_close(got[kept], bucketed_kd(student[kept], sub, tau, ids[kept], mode), what="other rows")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_extreme_logits_stay_finite_and_accurate(tau, dtype):
    """Student logits at +-50 and a teacher so sharp that its top-3 hold all but ~1e-26 of the mass (at tau = 1,
    1 - sum p_i is then 0 or -2.2e-16 in float64; the rest bucket's log must not see that): loss and gradient finite
    in every mode, and close to the float64 reference (loose in float32: the inputs themselves are rounded)."""
    gen = torch.Generator().manual_seed(40)
    raw = torch.randn(4, 12, generator=gen, dtype=DTYPE)
    raw[:, :3] += 60.0  # three near-certain classes
    raw[2] = torch.linspace(0, -40, 12, dtype=DTYPE)  # a moderately sharp one
    teacher = teacher_from_logits(raw, 12, torch.arange(12), torch.randperm(16, generator=gen)[:12], 16)
    student = (torch.randint(0, 2, (4, 16), generator=gen) * 100.0 - 50.0).to(DTYPE)
    student[3] = 0.0
    student[3, teacher.to_student[5]] = 50.0  # all the student's mass on one token of the teacher's rest
    k = 3
    ids, logprobs, _ = teacher.top_k(k)
    rtol, atol = (1e-6, 1e-9) if dtype == torch.float64 else (1e-3, 1e-3)
    for mode in ("support", "rest", "renormalize"):
        kwargs = {"support": teacher.support} if mode == "support" else {}
        got, grad = value_and_grad(
            lambda s, mode=mode, kwargs=kwargs: kd_loss(
                s, ids, logprobs, tau, mode, teacher.log_partition(tau), **kwargs
            ),
            student.to(dtype),
        )
        assert bool(torch.isfinite(got).all()), (mode, got)
        assert bool(torch.isfinite(grad).all()), mode
        if mode != "renormalize":
            want, want_grad = value_and_grad(lambda s, mode=mode: bucketed_kd(s, teacher, tau, ids, mode), student)
            assert_close(got.double(), want, rtol=rtol, atol=atol, what=f"{mode} loss, extreme")
            assert_close(grad.double(), want_grad, rtol=rtol, atol=atol, what=f"{mode} gradient, extreme")
    tail = draw_tail(teacher, k, 1.0, 6, torch.Generator().manual_seed(41))
    got, grad = value_and_grad(kd_support(teacher, k, tau, tail), student.to(dtype))
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(grad).all())
