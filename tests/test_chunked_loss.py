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


def make_targets(generator: torch.Generator, tail: bool, teachers: int = 2) -> Targets:
    """Top-k of a random teacher (tau-1 log-probabilities and A_tau at tau 2), with duplicate ids, a dropped id,
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
        log_partitions=torch.logsumexp(logp / 2.0, dim=1).float(),
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
