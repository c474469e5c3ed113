"""The chunked projection and losses (`projected_losses`) against the unchunked path and a dense reference.

`projected_losses` computes the logits hidden @ W.T + b a few positions at a time and takes each chunk's gradient
in forward; here it must give the losses and the gradients (hidden, weight, bias) of the plain path, logits built
whole and differentiated by autograd, with chunks smaller than the batch: positions with no kept id, duplicate
ids, two teachers' supports and the sampled tail included. With every teacher token cached, `support` is dense KD,
so the chunked loss is also checked against tau^2 * KL(softmax(t / tau) || softmax(s / tau)) written out here.
"""

from __future__ import annotations

import pytest
import torch

from mdkd.pipeline.distill.config import LossConfig
from mdkd.pipeline.distill.losses import (
    DistillationLoss,
    TailSample,
    Targets,
    chunk_positions,
    position_losses,
    projected_losses,
)

N, H, V, K, M = 11, 6, 40, 5, 4
ALPHA = 0.3


def make_targets(generator: torch.Generator, tail: bool, teachers: int = 2, tau: float = 2.0) -> Targets:
    """Top-k of a random teacher (tau-1 log-probabilities and A_tau at `tau`), with duplicate ids, a dropped id,
    and rows 2 and 7 with no kept id; two teachers' supports; tail draws outside the top-k."""
    teacher_logits = 3.0 * torch.randn(N, V, generator=generator, dtype=torch.float64)
    logp = torch.log_softmax(teacher_logits, dim=1)
    values, ids = logp.topk(K, dim=1)
    ids[0, 1] = ids[0, 0]  # twins mapped to one student token
    ids[4, 3] = -1  # dropped by a vocabulary cap
    ids[2] = ids[7] = -1
    supports = torch.rand(teachers, V, generator=generator) < 0.7
    teacher = torch.arange(N) % teachers
    supports[teacher.unsqueeze(1), ids.clamp(min=0)] = True  # a teacher's kept ids are in its support
    tail_sample = None
    if tail:
        outside = logp.scatter(1, ids.clamp(min=0), -torch.inf)
        drawn = torch.multinomial(outside.exp(), M, replacement=True, generator=generator)
        counts = torch.randint(1, 4, (N, M), generator=generator)
        drawn[5, 2:] = -1  # padding
        counts[5, 2:] = 0
        tail_sample = TailSample(
            drawn, counts, logp.gather(1, drawn.clamp(min=0)).float(), 1.0, torch.logsumexp(logp, dim=1).float()
        )
    return Targets(
        labels=torch.randint(0, V, (N,), generator=generator),
        topk_ids=ids,
        topk_logprobs=values.float(),
        log_partitions=torch.logsumexp(logp / tau, dim=1).float(),
        teacher=teacher,
        supports=supports,
        tail=tail_sample,
    )


def parameters(generator: torch.Generator, dtype=torch.float64):
    hidden = torch.randn(N, H, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64)
    bias = 0.5 * torch.randn(V, generator=generator, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]


def chunked(hidden, weight, bias, targets, settings, scale=1.7):
    total, kd, mlm = projected_losses(hidden, weight, bias, DistillationLoss(targets, settings, ALPHA))
    (total * scale).backward()
    return total.detach(), kd, mlm


def unchunked(hidden, weight, bias, targets, settings, scale=1.7):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    kd, mlm = position_losses(logits, targets, settings)
    total = ((1.0 - ALPHA) * mlm + ALPHA * kd).sum()
    (total * scale).backward()
    return total.detach(), kd.detach(), mlm.detach()


@pytest.mark.parametrize(
    ("missing_mass", "tail"), [("support", False), ("support", True), ("rest", False), ("renormalize", False)]
)
def test_chunks_give_the_unchunked_losses_and_gradients(missing_mass, tail):
    settings = LossConfig(missing_mass=missing_mass, temperature=2.0, logits_per_chunk=3 * V + 1)
    assert chunk_positions(V, settings) == 3  # chunks of 3, 3, 3 and 2 positions
    targets = make_targets(torch.Generator().manual_seed(1), tail)
    if missing_mass != "support":
        targets = Targets(targets.labels, targets.topk_ids, targets.topk_logprobs, targets.log_partitions)
    got_inputs = parameters(torch.Generator().manual_seed(2))
    want_inputs = parameters(torch.Generator().manual_seed(2))
    got = chunked(*got_inputs, targets, settings)
    want = unchunked(*want_inputs, targets, settings)
    for name, g, w in zip(("total", "kd", "mlm"), got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6, atol=1e-6, msg=name)
    assert (got[1][[2, 7]] == 0).all()  # no kept id: no KD
    for name, g, w in zip(("hidden", "weight", "bias"), got_inputs, want_inputs, strict=True):
        # MLM is fp32 (`mlm_loss`) whatever the logits' dtype: its rounding differs with the chunk's shape.
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_rows_without_kept_ids_get_only_the_mlm_gradient():
    settings = LossConfig(missing_mass="support", logits_per_chunk=2 * V)
    targets = make_targets(torch.Generator().manual_seed(3), tail=True)
    hidden, weight, bias = parameters(torch.Generator().manual_seed(4))
    chunked(hidden, weight, bias, targets, settings, scale=1.0)
    logits = (hidden @ weight.T + bias).detach()
    mlm_grad = (torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(targets.labels, V)) * (1.0 - ALPHA)
    torch.testing.assert_close(hidden.grad[[2, 7]], (mlm_grad @ weight.detach())[[2, 7]], rtol=1e-5, atol=1e-6)


def test_every_teacher_token_cached_gives_dense_kd():
    """k = V and a support of everything: the chunked `support` loss is dense KD (with MLM beside it)."""
    generator = torch.Generator().manual_seed(5)
    tau = 2.0
    teacher_logits = 2.0 * torch.randn(N, V, generator=generator, dtype=torch.float64)
    logp = torch.log_softmax(teacher_logits, dim=1)
    values, ids = logp.topk(V, dim=1)
    targets = Targets(
        labels=torch.randint(0, V, (N,), generator=generator),
        topk_ids=ids,
        topk_logprobs=values,
        log_partitions=torch.logsumexp(logp / tau, dim=1),
        teacher=torch.zeros(N, dtype=torch.long),
        supports=torch.ones(1, V, dtype=torch.bool),
    )
    settings = LossConfig(missing_mass="support", temperature=tau, logits_per_chunk=4 * V)
    hidden, weight, bias = parameters(torch.Generator().manual_seed(6))
    _, kd, mlm = chunked(hidden, weight, bias, targets, settings, scale=1.0)
    reference = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    student = torch.nn.functional.linear(*reference)
    teacher_tau = torch.log_softmax(teacher_logits / tau, dim=1)
    dense = tau**2 * (teacher_tau.exp() * (teacher_tau - torch.log_softmax(student / tau, dim=1))).sum(dim=1)
    cross_entropy = -torch.log_softmax(student, dim=1).gather(1, targets.labels.unsqueeze(1)).squeeze(1)
    ((1.0 - ALPHA) * cross_entropy + ALPHA * dense).sum().backward()
    torch.testing.assert_close(kd.double(), dense.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mlm.double(), cross_entropy.detach(), rtol=1e-6, atol=1e-6)
    for name, g, w in zip(("hidden", "weight", "bias"), (hidden, weight, bias), reference, strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-6, msg=name)  # MLM in fp32


def test_bf16_projection_keeps_its_dtypes_and_the_fp32_losses():
    """Under DeepSpeed's bf16 the hidden states and the projection are bf16: the losses stay fp32, the gradients
    come back in the parameters' dtype and agree with the fp32 ones to bf16 precision."""
    settings = LossConfig(missing_mass="support", logits_per_chunk=3 * V)
    targets = make_targets(torch.Generator().manual_seed(7), tail=True)
    low = parameters(torch.Generator().manual_seed(8), torch.bfloat16)
    full = parameters(torch.Generator().manual_seed(8), torch.float32)
    _, kd_low, mlm_low = chunked(*low, targets, settings)
    _, kd_full, mlm_full = chunked(*full, targets, settings)
    assert kd_low.dtype == mlm_low.dtype == torch.float32
    torch.testing.assert_close(kd_low, kd_full, rtol=0.05, atol=0.05)
    torch.testing.assert_close(mlm_low, mlm_full, rtol=0.05, atol=0.05)
    for g, w in zip(low, full, strict=True):
        assert g.grad.dtype == torch.bfloat16
        torch.testing.assert_close(g.grad.float(), w.grad, rtol=0.05, atol=0.05)


def test_no_gradient_wanted_computes_only_the_losses():
    settings = LossConfig(missing_mass="support", logits_per_chunk=V)
    targets = make_targets(torch.Generator().manual_seed(9), tail=False)
    hidden, weight, bias = (t.detach() for t in parameters(torch.Generator().manual_seed(10)))
    total, kd, mlm = projected_losses(hidden, weight, bias, DistillationLoss(targets, settings, ALPHA))
    assert not total.requires_grad
    want_kd, want_mlm = position_losses(torch.nn.functional.linear(hidden, weight, bias), targets, settings)
    torch.testing.assert_close(kd, want_kd)
    torch.testing.assert_close(mlm, want_mlm, check_dtype=False)


# ---------------------------------------------------------------------------------------------------------------
# The hand-written gradient (`_fused_chunk`) against autograd on the plain formula, in float64: any wrong term of
# a e + b E + c E_R or of the scatters (kept ids, draws, label) shows far above float64 rounding.
# ---------------------------------------------------------------------------------------------------------------


def plain_losses(logits: torch.Tensor, targets: Targets, missing_mass: str, tau: float):
    """(KD [N], MLM [N]) written out densely from the module docstring, in float64, differentiable by autograd."""
    n, vocab = logits.shape
    ids = targets.topk_ids
    valid = ids >= 0
    safe = ids.clamp(min=0)
    log_s = torch.log_softmax(logits / tau, dim=1)
    cached = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, safe, valid)  # the kept ids K
    rows = cached.any(dim=1)
    if missing_mass == "renormalize":
        t1 = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(
            1, safe, targets.topk_logprobs.double().exp() * valid
        )
        q = t1 / t1.sum(dim=1, keepdim=True).clamp(min=1e-300)
        log_q = torch.where(cached, q.clamp(min=1e-300).log() / tau, -torch.inf)
        log_q = torch.where(rows.unsqueeze(1), torch.log_softmax(log_q, dim=1), torch.zeros_like(log_q))
        kl = torch.where(cached, log_q.exp() * (log_q - log_s), torch.zeros_like(log_s)).sum(dim=1)
    else:
        p_tau = (targets.topk_logprobs.double() / tau - targets.log_partitions.double().unsqueeze(1)).exp() * valid
        t = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(1, safe, p_tau)  # twins summed
        rest = ~cached if missing_mass == "rest" else ~cached & targets.supports[targets.teacher]
        p_rest = torch.where(rest.any(dim=1), (1.0 - t.sum(dim=1)).clamp(min=0.0), 0.0)
        log_t = torch.where(cached, t.clamp(min=1e-300).log(), 0.0)
        kl = torch.where(cached, t * (log_t - log_s), torch.zeros_like(log_s)).sum(dim=1)
        log_s_rest = torch.logsumexp(log_s.masked_fill(~rest, -torch.inf), dim=1)
        has = p_rest > 0
        log_p_rest = torch.where(has, p_rest.clamp(min=1e-300).log(), 0.0)
        kl = kl + torch.where(has, p_rest * (log_p_rest - torch.where(has, log_s_rest, 0.0)), 0.0)
        tail = targets.tail
        if tail is not None:
            # Draws at tail.temperature from the teacher outside the cached top-k, reweighted to tau.
            at_tau = (
                tail.logprobs.double() / tau - targets.log_partitions.double().unsqueeze(1) - log_p_rest.unsqueeze(1)
            )
            cached_there = targets.topk_logprobs.double() / tail.temperature - tail.log_partition.double().unsqueeze(1)
            there = tail.logprobs.double() / tail.temperature - tail.log_partition.double().unsqueeze(1)
            there = there - (1.0 - cached_there.exp().sum(dim=1, keepdim=True)).log()
            drawn = (tail.ids >= 0) & (tail.counts > 0) & has.unsqueeze(1)
            share = tail.counts.double() * drawn / (tail.counts.double() * drawn).sum(dim=1, keepdim=True).clamp(min=1)
            if tail.temperature != tau:
                share = share * torch.where(drawn, at_tau - there, 0.0).exp()
            student = log_s.gather(1, tail.ids.clamp(min=0)) - torch.where(has, log_s_rest, 0.0).unsqueeze(1)
            inside = torch.where(drawn, share * (torch.where(drawn, at_tau, 0.0) - student), 0.0).sum(dim=1)
            kl = kl + p_rest * inside
    kd = torch.where(rows, tau**2 * kl, 0.0)
    mlm = torch.nn.functional.cross_entropy(logits, targets.labels, reduction="none")
    return kd, mlm


CASES = [
    ("support", False, 2.0),
    ("support", True, 2.0),
    ("support", True, 1.0),
    ("support", False, 0.7),
    ("rest", False, 2.0),
    ("rest", False, 1.0),
    ("renormalize", False, 2.0),
    ("renormalize", False, 1.0),
]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("missing_mass", "tail", "tau"), CASES)
def test_hand_written_gradient_is_autograd_of_the_plain_formula(missing_mass, tail, tau, alpha):
    """Float64 throughout, chunks of 3 positions: values and gradients to 1e-10 of autograd on `plain_losses`.
    alpha 0 and 1 isolate MLM's and KD's terms; tau 1 takes the shared-exponential branch; the tail's draws are
    made at tau 1, so at tau != 1 they are importance-weighted."""
    targets = make_targets(torch.Generator().manual_seed(11), tail, tau=tau)
    if missing_mass != "support":
        targets = Targets(targets.labels, targets.topk_ids, targets.topk_logprobs, targets.log_partitions)
    settings = LossConfig(missing_mass=missing_mass, temperature=tau, logits_per_chunk=3 * V)
    got_inputs = parameters(torch.Generator().manual_seed(12))
    want_inputs = parameters(torch.Generator().manual_seed(12))
    total, kd, mlm = projected_losses(*got_inputs, DistillationLoss(targets, settings, alpha))
    (total * 1.3).backward()
    want_kd, want_mlm = plain_losses(torch.nn.functional.linear(*want_inputs), targets, missing_mass, tau)
    (((1.0 - alpha) * want_mlm + alpha * want_kd).sum() * 1.3).backward()
    assert kd.dtype == torch.float64
    torch.testing.assert_close(kd, want_kd.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlm, want_mlm.detach(), rtol=1e-10, atol=1e-10)
    for name, g, w in zip(("hidden", "weight", "bias"), got_inputs, want_inputs, strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("missing_mass", ["support", "rest"])
def test_a_rest_too_small_for_the_shared_shift_is_redone_exactly(missing_mass):
    """Rows whose rest holds less than 2^-100 of the largest tempered exponential (here: every rest logit 400
    below the kept ones) take the general path; in float32 the losses and gradients still match it."""
    targets = make_targets(torch.Generator().manual_seed(13), tail=missing_mass == "support")
    if missing_mass != "support":
        targets = Targets(targets.labels, targets.topk_ids, targets.topk_logprobs, targets.log_partitions)
    settings = LossConfig(missing_mass=missing_mass, temperature=2.0, logits_per_chunk=4 * V)
    hidden, weight, bias = parameters(torch.Generator().manual_seed(14), torch.float32)
    with torch.no_grad():
        bias -= 400.0
        bias[targets.topk_ids[:3].clamp(min=0).flatten()] += 400.0  # rows 0 and 1 (row 2 has none): far rest
    got_inputs = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want_inputs = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    got = chunked(*got_inputs, targets, settings)
    want = unchunked(*want_inputs, targets, settings)
    assert torch.isfinite(got[1]).all()
    for name, g, w in zip(("total", "kd", "mlm"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    for name, g, w in zip(("hidden", "weight", "bias"), got_inputs, want_inputs, strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_one_teacher_and_unscored_labels():
    """One teacher's support (broadcast, no gather) and a label of -100 (cross_entropy's ignore_index): MLM 0 and
    no MLM gradient there, as the unchunked path."""
    base = make_targets(torch.Generator().manual_seed(15), tail=True, teachers=1)
    labels = base.labels.clone()
    labels[3] = -100
    targets = Targets(
        labels, base.topk_ids, base.topk_logprobs, base.log_partitions, base.teacher, base.supports, base.tail
    )
    settings = LossConfig(missing_mass="support", temperature=2.0, logits_per_chunk=5 * V)
    got_inputs = parameters(torch.Generator().manual_seed(16))
    want_inputs = parameters(torch.Generator().manual_seed(16))
    got = chunked(*got_inputs, targets, settings)
    want = unchunked(*want_inputs, targets, settings)
    assert got[2][3] == 0
    for name, g, w in zip(("total", "kd", "mlm"), got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-6, atol=1e-6, msg=name)
    for name, g, w in zip(("hidden", "weight", "bias"), got_inputs, want_inputs, strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-6, msg=name)
