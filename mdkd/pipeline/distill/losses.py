"""Distillation losses at masked positions, from cached top-k teacher predictions.

Per masked position the cache holds the teacher's k most probable tokens (already mapped into the student vocabulary,
-1 = dropped, e.g. by a vocabulary cap), their log-probabilities logp_i at temperature 1 (the teacher's full-vocabulary
log-softmax; from schema 3 over canonical tokens, twins summed) and, per temperature tau, the tempered log-partition
A_tau = logsumexp_j(logp_j / tau) over the teacher's FULL vocabulary. Write s_tau = softmax(student logits / tau). The
teacher's exact tempered probability of a cached token is p_i = exp(logp_i / tau - A_tau).

- `support` (default, exact): three kinds of bucket. Each of the k' kept tokens is a bucket; "rest" is the teacher's
  own vocabulary outside them (its support in the student vocabulary, `support`, less the kept tokens), with
  teacher mass 1 - sum p_i; everything else in the student vocabulary (tokens only other teachers have) has teacher
  mass exactly 0, so the student is taught to put nothing there. With every teacher token present the rest is empty
  and the loss is the dense KD loss. Given a sampled tail (`TailSample`: ids drawn from the teacher's tempered
  distribution outside the cached top-k), the rest bucket's internal term P_R * KL(p_R / P_R || s_R / S_R) is added
  as an unbiased estimate (Anshumann et al., 2025): the average over the draws of log(p_j / P_R) - log(s_j / S_R),
  importance-weighted exactly when the draws were made at another temperature. The whole is then an unbiased
  estimate of the dense KD loss, and of its gradient.
- `rest` (schema 2's): two kinds of bucket, the kept tokens and "rest" = everything else in the student vocabulary
  (dropped ids included), so the student may put the teacher's rest on tokens the teacher cannot emit. Kept for
  comparison and for caches whose runs used it.
- `renormalize` (Knowledge Inheritance's top-K recipe): the tau = 1 probabilities of the kept ids are merged, then
  renormalised to q and tempered, q_tau ∝ q^(1/tau); the student side is s_tau at those ids. This teaches the student
  that everything outside the top-k has probability 0. `teacher_log_partition` is ignored.
- Ids mapped to the same student token are merged by summing their tempered probabilities (a schema-2 cache's twins
  inside the top-k; schema 3 sums twins over the whole vocabulary before the top-k).
- KD = tau^2 * KL(teacher buckets || student buckets) (Hinton et al.: tau^2 keeps gradient scale comparable).
- A position with no kept id (all -1) contributes loss 0 and gradient 0 in every mode; teacher-side quantities are
  sanitised before they meet the student so that masked-out entries cannot leak NaN into the gradient.
- MLM = cross-entropy of the student (temperature 1) against the original token.

Training does not build the [N, V] logits: `projected_losses` runs the student's vocabulary projection and both
losses over chunks of positions, and takes each chunk's gradient (with respect to the hidden states, the weight and
the bias) while its logits are alive, so the loss holds a few [chunk, V] blocks at a time and the projection runs
three matrix products, as it would unchunked, with nothing recomputed in backward. The losses are per position, so
the chunks change nothing beyond float rounding. torch's `linear_cross_entropy` (2.13) does the same for
cross-entropy alone; the KD buckets need the logits themselves, and sharing one projection between KD and MLM
needs both in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdkd.pipeline.distill.config import AlphaConfig, LossConfig

MISSING_MASS_MODES = ("support", "rest", "renormalize")


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum probabilities of equal ids within each row; the later duplicates get probability 0 and id -1.

    ids: [N, k] student ids (-1 = no token), probs: [N, k]. Returns tensors of the same shapes. Memory and time are
    O(N k log k) (a sort per row), so k can be a whole vocabulary.
    """
    valid = ids >= 0
    probs = torch.where(valid, probs, torch.zeros_like(probs))
    k = ids.shape[1]
    ordered, order = ids.sort(dim=1, stable=True)  # equal ids side by side, in column order
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1  # [N, k]: each sorted entry's run of equal ids
    sums = torch.zeros_like(probs).scatter_add_(1, group, probs.gather(1, order))
    # A run's first column (the smallest, the sort being stable) keeps the run's sum; the others are emptied.
    first = torch.full_like(order, k).scatter_reduce_(1, group, order, reduce="amin")
    keep_sorted = order == first.gather(1, group)
    keep = torch.zeros_like(valid).scatter_(1, order, keep_sorted) & valid
    merged = torch.zeros_like(probs).scatter_(1, order, sums.gather(1, group))
    return torch.where(keep, ids, torch.full_like(ids, -1)), torch.where(keep, merged, torch.zeros_like(merged))


@dataclass(frozen=True)
class TailSample:
    """Ids drawn from the teacher's distribution outside its cached top-k, for `support`'s internal rest term.

    ids [N, M] student ids (-1: padding, or a draw the student cannot spell), counts [N, M] how often each was drawn
    (0 for padding), logprobs [N, M] the teacher's log-probability of each at tau = 1, and the draws' temperature
    with the teacher's log-partition there, log_partition [N]."""

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    temperature: float
    log_partition: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    missing_mass: str = "rest",
    teacher_log_partition: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
    tail: TailSample | None = None,
) -> torch.Tensor:
    """Per-position KD loss [N] (see the module docstring).

    student_logits [N, V] (any float dtype; computed in at least fp32), teacher_ids [N, k] student ids or -1,
    teacher_logprobs [N, k] cached teacher log-probabilities at tau = 1 (full-vocabulary log-softmax),
    teacher_log_partition [N] the cached A_tau = logsumexp(logp / tau) for this `temperature` (required in `rest`
    and `support`), support [N, V] bool: the student tokens each position's teacher can emit (required in
    `support`), tail: the sampled tail (`support` only; None: the rest bucket's inside is left free).
    """
    if missing_mass not in MISSING_MASS_MODES:
        raise ValueError(f"missing_mass must be one of {MISSING_MASS_MODES}, got {missing_mass!r}")
    n, vocab = student_logits.shape
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(dtype) / temperature
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)  # [N, 1]

    # Teacher side in float64: it is [N, k], and the rest is a difference of sums.
    valid = teacher_ids >= 0
    teacher_logq = teacher_logprobs.double()
    if missing_mass == "support" and (support is None or support.shape != student_logits.shape):
        raise ValueError("missing_mass='support' needs support, a [N, V] bool mask of each teacher's tokens")
    if tail is not None and missing_mass != "support":
        raise ValueError("a sampled tail goes with missing_mass='support' only")
    if missing_mass != "renormalize":
        if teacher_log_partition is None:
            raise ValueError(f"missing_mass={missing_mass!r} needs teacher_log_partition (A_tau for this temperature)")
        if teacher_log_partition.shape != (n,):
            raise ValueError(f"teacher_log_partition must have shape ({n},), got {tuple(teacher_log_partition.shape)}")
        teacher_logq = teacher_logq / temperature - teacher_log_partition.double().unsqueeze(1)
    # Per-id probabilities (tempered in `rest`, at tau = 1 in `renormalize`), merged per student id; -1 = none.
    ids, probs = merge_duplicates(teacher_ids, torch.where(valid, teacher_logq.exp(), torch.zeros_like(teacher_logq)))
    kept = ids >= 0
    row_valid = kept.any(dim=1, keepdim=True)  # [N, 1]: rows with no target contribute nothing
    gathered = logits.gather(1, ids.clamp(min=0)) - log_z  # student log s_tau at the bucket ids, [N, k]

    if missing_mass == "renormalize":
        mask = kept & (probs > 0)
        tempered = torch.where(mask, probs.clamp(min=torch.finfo(probs.dtype).tiny).log() / temperature, -torch.inf)
        tempered = torch.where(mask.any(dim=1, keepdim=True), tempered, torch.zeros_like(tempered))  # no all -inf rows
        teacher_logp = torch.log_softmax(tempered, dim=1)
        student_logp = gathered
    else:
        # Student mass in the rest bucket: the bucket ids masked out of the vocabulary (dropped ids go to a spare
        # column), and in `support` everything the teacher cannot emit too.
        slot = torch.where(kept, ids, torch.full_like(ids, vocab))
        in_bucket = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, slot, True)[:, :vocab]
        outside_rest = in_bucket if support is None else in_bucket | ~support
        has_rest = (~outside_rest & (logits > -torch.inf)).any(dim=1, keepdim=True)  # a non-empty, finite rest
        # Rows without a rest keep the full row, so logsumexp never sees only -inf and student_rest stays finite.
        rest_logits = logits.masked_fill(outside_rest & has_rest, -torch.inf)
        student_rest = torch.logsumexp(rest_logits, dim=1, keepdim=True) - log_z
        teacher_rest = (1.0 - probs.sum(dim=1, keepdim=True)).clamp(min=0.0)
        # An empty rest is exactly 0 for the teacher too (what is left there is float rounding).
        teacher_rest = torch.where(has_rest, teacher_rest, torch.zeros_like(teacher_rest))
        probs = torch.cat([probs, teacher_rest], dim=1)
        mask = torch.cat([kept, has_rest], dim=1) & (probs > 0)
        teacher_logp = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
        student_logp = torch.cat([gathered, student_rest], dim=1)

    mask = mask & row_valid
    # Sanitise the teacher side where masked out, so 0 * NaN cannot reach the student's gradient.
    teacher_logp = torch.where(mask, teacher_logp, torch.zeros_like(teacher_logp))
    teacher_rest_logp = teacher_logp[:, -1:]  # log P_R in float64, for the sampled tail
    teacher_p = torch.where(mask, teacher_logp.exp(), torch.zeros_like(teacher_logp)).to(dtype)
    teacher_logp = teacher_logp.to(dtype)
    terms = torch.where(mask, teacher_p * (teacher_logp - student_logp), torch.zeros_like(student_logp))
    loss = terms.sum(dim=1)
    if tail is not None:
        rest_mask = mask[:, -1:]
        loss = loss + _sampled_rest(
            logits.gather(1, tail.ids.clamp(min=0)) - log_z,  # gathered first: no [N, V] difference
            student_rest,
            teacher_rest_logp,
            rest_mask,
            tail,
            temperature,
            teacher_log_partition,
            teacher_logprobs,
        ).to(dtype)
    return temperature**2 * loss


def _sampled_rest(
    student_logp_drawn: torch.Tensor,
    student_rest: torch.Tensor,
    teacher_rest_logp: torch.Tensor,
    has_rest: torch.Tensor,
    tail: TailSample,
    temperature: float,
    teacher_log_partition: torch.Tensor,
    cached_logprobs: torch.Tensor,
) -> torch.Tensor:
    """[N] the unbiased estimate of the rest bucket's internal term, P_R * KL(p_R / P_R || s_R / S_R), from the
    draws: P_R * sum_m (c_m / M) * w_m * (log(p_m / P_R) - log(s_m / S_R)), with student_logp_drawn [N, M] the
    student's log s_tau at the draws. The draws were made from the teacher's
    distribution outside its whole cached top-k at tail.temperature, so w_m = (p_m / P_R at tau) / (p_m / P_R' at
    the draws' temperature), exact from the cached log-partitions; w = 1 when the two temperatures agree."""
    drawn = (tail.ids >= 0) & (tail.counts > 0) & has_rest
    total = tail.counts.double().mul(drawn).sum(dim=1, keepdim=True)
    drawn = drawn & (total > 0)
    share = torch.where(drawn, tail.counts.double() / total.clamp(min=1), torch.zeros_like(total))
    teacher_conditional = (
        tail.logprobs.double() / temperature - teacher_log_partition.double().unsqueeze(1) - teacher_rest_logp.double()
    )  # log(p_m / P_R) at tau
    if tail.temperature != temperature:
        draws_partition = tail.log_partition.double().unsqueeze(1)
        cached_mass = (cached_logprobs.double() / tail.temperature - draws_partition).exp().sum(dim=1, keepdim=True)
        draws_rest = (1.0 - cached_mass).clamp(min=torch.finfo(torch.float64).tiny).log()
        draws_conditional = tail.logprobs.double() / tail.temperature - draws_partition - draws_rest
        share = share * torch.where(drawn, teacher_conditional - draws_conditional, torch.zeros_like(share)).exp()
    teacher_conditional = torch.where(drawn, teacher_conditional, torch.zeros_like(teacher_conditional))
    student_conditional = (student_logp_drawn - student_rest).double()
    estimate = torch.where(drawn, share * (teacher_conditional - student_conditional), torch.zeros_like(share)).sum(1)
    return teacher_rest_logp.double().squeeze(1).exp() * estimate


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [N] against the original tokens."""
    return torch.nn.functional.cross_entropy(student_logits.float(), labels, reduction="none")


@dataclass(frozen=True)
class Targets:
    """What both losses need at N masked positions, on the device: labels [N], the cached top-k ids and
    log-probabilities [N, k'], the log-partitions [N] (None: none cached), for `support` each position's teacher
    [N] (an index into supports [teachers, V], each teacher's tokens), and the sampled tail (None: none)."""

    labels: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    log_partitions: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    supports: torch.Tensor | None = None
    tail: TailSample | None = None

    def rows(self, part: slice) -> Targets:
        """The targets of positions `part`; `supports` is per teacher, so it is kept whole."""
        tail = self.tail
        if tail is not None:
            tail = TailSample(
                tail.ids[part], tail.counts[part], tail.logprobs[part], tail.temperature, tail.log_partition[part]
            )
        return Targets(
            self.labels[part],
            self.topk_ids[part],
            self.topk_logprobs[part],
            None if self.log_partitions is None else self.log_partitions[part],
            None if self.teacher is None else self.teacher[part],
            self.supports,
            tail,
        )


def position_losses(logits: torch.Tensor, targets: Targets, settings: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD [N], MLM [N]) from the student's logits [N, V] at the positions of `targets`."""
    support = None if targets.supports is None else targets.supports[targets.teacher]  # [N, V] bool
    kd = kd_loss(
        logits,
        targets.topk_ids,
        targets.topk_logprobs,
        settings.temperature,
        missing_mass=settings.missing_mass,
        teacher_log_partition=targets.log_partitions,
        support=support,
        tail=targets.tail,
    )
    return kd, mlm_loss(logits, targets.labels)


@dataclass(frozen=True)
class DistillationLoss:
    """The loss of one micro-batch: sum over positions of (1 - alpha) * MLM + alpha * KD."""

    targets: Targets
    settings: LossConfig
    alpha: float


def projected_losses(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, loss: DistillationLoss
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, KD [N], MLM [N]) of the logits hidden @ weight.T + bias, computed in chunks of positions (see the
    module docstring): total = sum of (1 - alpha) * MLM + alpha * KD, differentiable with respect to hidden [N, H],
    weight [V, H] and bias [V]; the per-position losses are for metrics and carry no gradient."""
    return _ProjectedLosses.apply(hidden, weight, bias, loss)


def chunk_positions(vocab: int, settings: LossConfig) -> int:
    """Masked positions per chunk: as many as keep a chunk's logits within `settings.logits_per_chunk`."""
    return max(1, settings.logits_per_chunk // vocab)


class _ProjectedLosses(torch.autograd.Function):
    """Forward computes the losses and, chunk by chunk, their gradients; backward scales those gradients by the
    incoming one (so only one backward, as in torch's `linear_cross_entropy`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss: DistillationLoss):
        n, vocab = hidden.shape[0], weight.shape[0]
        wants = ctx.needs_input_grad[:3]
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)  # the losses in at least fp32
        kd = torch.zeros(n, dtype=loss_dtype, device=hidden.device)
        mlm = torch.zeros_like(kd)
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        # The weight's gradient is a sum over chunks: accumulated in fp32 whatever the weight's dtype.
        grad_weight = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if wants[1] else None
        grad_bias = torch.zeros(vocab, dtype=loss_dtype, device=weight.device) if wants[2] else None
        step = chunk_positions(vocab, loss.settings)
        for start in range(0, n, step):
            part = slice(start, min(start + step, n))
            chunk = hidden[part]
            # Computed under no_grad, so a leaf: the chunk's own graph starts at the logits and ends here.
            logits = torch.nn.functional.linear(chunk, weight, bias).to(loss_dtype).requires_grad_(any(wants))
            with torch.enable_grad():
                kd_part, mlm_part = position_losses(logits, loss.targets.rows(part), loss.settings)
                total = ((1.0 - loss.alpha) * mlm_part + loss.alpha * kd_part).sum()
                grad_logits = torch.autograd.grad(total, logits)[0] if any(wants) else None
            kd[part], mlm[part] = kd_part.detach(), mlm_part.detach()
            if grad_logits is None:
                continue
            del logits, kd_part, mlm_part, total  # the chunk's graph: free it before the products below
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight
            if grad_weight is not None and grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.T, chunk)  # in place: no [V, H] temporary per chunk
            elif grad_weight is not None:
                grad_weight += grad_logits.T @ chunk
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(kd, mlm)
        per_position = (1.0 - loss.alpha) * mlm + loss.alpha * kd
        return per_position.sum(), kd, mlm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_mlm):
        grads = tuple(
            None if grad is None else grad.mul_(grad_total).to(dtype)
            for grad, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        )
        ctx.grads = None  # scaled in place: a second backward through this graph would be wrong
        return (*grads, None)


def alpha_at(step: int, settings: AlphaConfig, total_steps: int) -> float:
    """The KD weight alpha_t at optimizer step `step` (0-based)."""
    horizon = settings.steps or total_steps
    if settings.schedule == "constant":
        return settings.start
    if settings.schedule == "linear":
        return settings.start * max(1.0 - step / horizon, 0.0)
    return settings.start if step < horizon else 0.0
