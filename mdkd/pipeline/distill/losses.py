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
the bias) while its logits are alive, so the loss holds two [chunk, V] blocks, reused by every chunk, and the
projection runs three matrix products, as it would unchunked, with nothing recomputed in backward. The
vocabulary-wide part of both losses and its gradient are written out by hand (`_fused_chunk`: one shared maximum,
the exponentials at tau and at 1, the rest bucket as a sum of the same exponentials with the kept ids emptied, and
the gradient a e + b E + c E_R plus scatters at the kept ids, the draws and the label), about eleven elementwise
passes over a chunk instead of some thirty through autograd; the [N, k] teacher side is shared with `kd_loss`, the
general path, which still serves students whose head does not split and rows whose rest is too small for the
shared maximum. The losses are per position, so the chunks change nothing beyond float rounding. torch's
`linear_cross_entropy` (2.13) does the same for cross-entropy alone (its soft-label form needs a dense [N, V]
target); the KD buckets need the logits themselves, and sharing one projection between KD and MLM needs both in
one pass.
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

    if missing_mass == "support" and (support is None or support.shape != student_logits.shape):
        raise ValueError("missing_mass='support' needs support, a [N, V] bool mask of each teacher's tokens")
    if tail is not None and missing_mass != "support":
        raise ValueError("a sampled tail goes with missing_mass='support' only")
    ids, probs = teacher_probabilities(teacher_ids, teacher_logprobs, temperature, missing_mass, teacher_log_partition)
    kept = ids >= 0
    gathered = logits.gather(1, ids.clamp(min=0)) - log_z  # student log s_tau at the bucket ids, [N, k]
    has_rest = student_rest = None
    if missing_mass != "renormalize":
        # Student mass in the rest bucket: the bucket ids masked out of the vocabulary (dropped ids go to a spare
        # column), and in `support` everything the teacher cannot emit too.
        slot = torch.where(kept, ids, torch.full_like(ids, vocab))
        in_bucket = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, slot, True)[:, :vocab]
        outside_rest = in_bucket if support is None else in_bucket | ~support
        has_rest = (~outside_rest & (logits > -torch.inf)).any(dim=1, keepdim=True)  # a non-empty, finite rest
        # Rows without a rest keep the full row, so logsumexp never sees only -inf and student_rest stays finite.
        rest_logits = logits.masked_fill(outside_rest & has_rest, -torch.inf)
        student_rest = torch.logsumexp(rest_logits, dim=1, keepdim=True) - log_z
    buckets = teacher_buckets(ids, probs, temperature, missing_mass, has_rest, dtype)
    student_logp = gathered if student_rest is None else torch.cat([gathered, student_rest], dim=1)
    mask, teacher_p, teacher_logp = buckets.mask, buckets.p, buckets.logp
    terms = torch.where(mask, teacher_p * (teacher_logp - student_logp), torch.zeros_like(student_logp))
    loss = terms.sum(dim=1)
    if tail is not None:
        loss = (
            loss
            + _sampled_rest(
                logits.gather(1, tail.ids.clamp(min=0)) - log_z,  # gathered first: no [N, V] difference
                student_rest,
                buckets.rest_logp64,
                mask[:, -1:],
                tail,
                temperature,
                teacher_log_partition,
                teacher_logprobs,
            ).to(dtype)
        )
    return temperature**2 * loss


def teacher_probabilities(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    missing_mass: str,
    teacher_log_partition: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k], probs [N, k] float64): the cached ids merged per student id (-1 = none) with their teacher
    probabilities, tempered (p_i = exp(logp_i / tau - A_tau)) except in `renormalize` (tau = 1)."""
    n = teacher_ids.shape[0]
    valid = teacher_ids >= 0
    # Teacher side in float64: it is [N, k], and the rest is a difference of sums.
    teacher_logq = teacher_logprobs.double()
    if missing_mass != "renormalize":
        if teacher_log_partition is None:
            raise ValueError(f"missing_mass={missing_mass!r} needs teacher_log_partition (A_tau for this temperature)")
        if teacher_log_partition.shape != (n,):
            raise ValueError(f"teacher_log_partition must have shape ({n},), got {tuple(teacher_log_partition.shape)}")
        teacher_logq = teacher_logq / temperature - teacher_log_partition.double().unsqueeze(1)
    return merge_duplicates(teacher_ids, torch.where(valid, teacher_logq.exp(), torch.zeros_like(teacher_logq)))


@dataclass(frozen=True)
class TeacherBuckets:
    """The teacher's side of the KD sum, sanitised: mask [N, B] the buckets in the loss (the kept ids, then in
    `rest` and `support` the rest as the last column), their probabilities p [N, B] (0 where masked out) and
    log-probabilities logp [N, B] (0 where masked out) in the loss's dtype, and log P_R [N, 1] in float64 (0 where
    masked out; for the sampled tail)."""

    mask: torch.Tensor
    p: torch.Tensor
    logp: torch.Tensor
    rest_logp64: torch.Tensor | None


def teacher_buckets(
    ids: torch.Tensor,
    probs: torch.Tensor,
    temperature: float,
    missing_mass: str,
    has_rest: torch.Tensor | None,
    dtype: torch.dtype,
) -> TeacherBuckets:
    """The buckets of `teacher_probabilities`' output; has_rest [N, 1]: whether the student's rest is non-empty
    (None in `renormalize`)."""
    kept = ids >= 0
    row_valid = kept.any(dim=1, keepdim=True)  # [N, 1]: rows with no target contribute nothing
    if missing_mass == "renormalize":
        mask = kept & (probs > 0)
        tempered = torch.where(mask, probs.clamp(min=torch.finfo(probs.dtype).tiny).log() / temperature, -torch.inf)
        tempered = torch.where(mask.any(dim=1, keepdim=True), tempered, torch.zeros_like(tempered))  # no all -inf rows
        teacher_logp = torch.log_softmax(tempered, dim=1)
    else:
        teacher_rest = (1.0 - probs.sum(dim=1, keepdim=True)).clamp(min=0.0)
        # An empty rest is exactly 0 for the teacher too (what is left there is float rounding).
        teacher_rest = torch.where(has_rest, teacher_rest, torch.zeros_like(teacher_rest))
        probs = torch.cat([probs, teacher_rest], dim=1)
        mask = torch.cat([kept, has_rest], dim=1) & (probs > 0)
        teacher_logp = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
    mask = mask & row_valid
    # Sanitise the teacher side where masked out, so 0 * NaN cannot reach the student's gradient.
    teacher_logp = torch.where(mask, teacher_logp, torch.zeros_like(teacher_logp))
    rest_logp64 = None if missing_mass == "renormalize" else teacher_logp[:, -1:]
    teacher_p = torch.where(mask, teacher_logp.exp(), torch.zeros_like(teacher_logp)).to(dtype)
    return TeacherBuckets(mask, teacher_p, teacher_logp.to(dtype), rest_logp64)


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
    student's log s_tau at the draws (see `_tail_shares` for the weights)."""
    drawn, share, teacher_conditional = _tail_shares(
        has_rest, tail, temperature, teacher_log_partition, cached_logprobs, teacher_rest_logp
    )
    student_conditional = (student_logp_drawn - student_rest).double()
    estimate = torch.where(drawn, share * (teacher_conditional - student_conditional), torch.zeros_like(share)).sum(1)
    return teacher_rest_logp.double().squeeze(1).exp() * estimate


def _tail_shares(
    has_rest: torch.Tensor,
    tail: TailSample,
    temperature: float,
    teacher_log_partition: torch.Tensor,
    cached_logprobs: torch.Tensor,
    teacher_rest_logp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(drawn [N, M] bool, share [N, M] float64, log(p_m / P_R) [N, M] float64, 0 where not drawn): each draw's
    weight (c_m / M) * w_m in the sampled rest term. The draws were made from the teacher's distribution outside
    its whole cached top-k at tail.temperature, so w_m = (p_m / P_R at tau) / (p_m / P_R' at the draws'
    temperature), exact from the cached log-partitions; w = 1 when the two temperatures agree."""
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
    return drawn, share, teacher_conditional


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
    """Forward computes the losses and, chunk by chunk, their gradients (`_fused_chunk`); backward scales those
    gradients by the incoming one (so only one backward, as in torch's `linear_cross_entropy`)."""

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
        step = min(chunk_positions(vocab, loss.settings), max(n, 1))
        # Two [chunk, V] blocks, reused by every chunk: the logits (then the gradient) and the tempered exponentials.
        logits_block = torch.empty(step, vocab, dtype=loss_dtype, device=hidden.device)
        work_block = torch.empty_like(logits_block)
        vocabulary = _VocabularyTargets.of(loss.targets, loss.settings, vocab, loss_dtype)
        targets, order = loss.targets, None
        if vocabulary.inside is not None and vocabulary.inside.shape[0] > 1:
            # Positions sorted by teacher, so that a chunk's rows of one teacher are a run (`_fused_chunk`).
            order = torch.argsort(targets.teacher, stable=True)
            hidden, targets = hidden[order], targets.rows(order)
        for start in range(0, n, step):
            part = slice(start, min(start + step, n))
            chunk = hidden[part]
            logits = logits_block[: part.stop - start]
            if weight.dtype == loss_dtype and bias is not None:
                torch.addmm(bias, chunk, weight.T, out=logits)
            elif weight.dtype == loss_dtype:
                torch.mm(chunk, weight.T, out=logits)
            else:
                logits.copy_(torch.nn.functional.linear(chunk, weight, bias))

            def exact(rows, chunk=chunk, part=part):
                """The general path's losses and gradient at some of the chunk's rows."""
                redo = torch.nn.functional.linear(chunk[rows], weight, bias).to(loss_dtype).requires_grad_(any(wants))
                with torch.enable_grad():
                    kd_rows, mlm_rows = position_losses(redo, targets.rows(part).rows(rows), loss.settings)
                    total = ((1.0 - loss.alpha) * mlm_rows + loss.alpha * kd_rows).sum()
                    grad = torch.autograd.grad(total, redo)[0] if any(wants) else None
                return kd_rows.detach(), mlm_rows.detach(), grad

            kd[part], mlm[part] = _fused_chunk(
                logits,
                work_block[: part.stop - start],
                targets.rows(part),
                vocabulary,
                loss.settings,
                loss.alpha,
                any(wants),
                exact,
            )
            if not any(wants):
                continue
            grad_logits = logits if weight.dtype == loss_dtype else logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight
            if grad_weight is not None and grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.T, chunk)  # in place: no [V, H] temporary per chunk
            elif grad_weight is not None:
                grad_weight += grad_logits.T @ chunk
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        del logits_block, work_block
        if order is not None:  # back to the caller's order (the weight's and the bias's gradients are sums)
            kd, mlm = torch.empty_like(kd).index_copy_(0, order, kd), torch.empty_like(mlm).index_copy_(0, order, mlm)
            if grad_hidden is not None:
                grad_hidden = torch.empty_like(grad_hidden).index_copy_(0, order, grad_hidden)
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


# A rest sum (relative to the row's largest tempered exponential, 1) below this is redone by the general path: its
# terms may sit among float32's subnormals, where the shared shift loses them (the general path takes the rest's
# own maximum). 2^-100 leaves V * (smallest subnormal) / 2^-100 < 1e-9 of relative error at V = 1e6.
_SMALLEST_FUSED_REST = 2.0**-100


@dataclass(frozen=True)
class _VocabularyTargets:
    """What `_fused_chunk` needs over the vocabulary, made once per micro-batch: in `support`, the sums matrix
    [V, 1 + teachers] (a column of ones, then each teacher's support as 0/1), each teacher's count of tokens, and
    the supports as 0/1 [teachers, V] in the loss's dtype."""

    sums: torch.Tensor | None = None
    support_sizes: torch.Tensor | None = None
    inside: torch.Tensor | None = None

    @classmethod
    def of(cls, targets: Targets, settings: LossConfig, vocab: int, dtype: torch.dtype) -> _VocabularyTargets:
        if settings.missing_mass != "support":
            return cls()
        if targets.supports is None or targets.teacher is None or targets.supports.shape[1] != vocab:
            raise ValueError("missing_mass='support' needs each position's teacher and the supports [teachers, V]")
        supports = targets.supports.bool()
        ones = torch.ones(vocab, 1, dtype=dtype, device=supports.device)
        inside = supports.to(dtype)
        return cls(torch.cat([ones, inside.T], dim=1), supports.sum(dim=1), inside)


def _fused_chunk(
    logits: torch.Tensor,
    work: torch.Tensor,
    targets: Targets,
    vocabulary: _VocabularyTargets,
    settings: LossConfig,
    alpha: float,
    want_grad: bool,
    exact,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD [n], MLM [n]) of one chunk's logits [n, V] (finite, as a linear layer's are), the same values as
    `position_losses` up to float rounding; with want_grad, `logits` is overwritten with the gradient of
    sum((1 - alpha) * MLM + alpha * KD) with respect to it. `work` [n, V] is scratch; `exact(rows)` gives the
    general path's (KD, MLM, gradient) at some rows, for those whose rest sum is too small to trust here.

    Write x = z - m (m the row's largest logit), e = exp(x), E = exp(x / tau), S1 = sum e, S = sum E, s = E / S,
    K the kept (merged) ids with teacher probabilities P_i, R the rest (the vocabulary less K; in `support`, the
    teacher's support less K) with S_R = sum_R E and teacher mass P_R, and W = sum_K P_i + P_R (the masses in the
    loss; P_R = 0 in `renormalize`). Then log s_i = z_i / tau - m / tau - log S, log(S_R / S) the rest's, and
        d MLM / dz_j = e_j / S1 - [j = label]
        d KD / dz_j = tau * (W s_j - sum_i P_i [j = i] - P_R [j in R] E_j / S_R)      (KD = tau^2 KL, per bucket:
                      d(-log s_i)/dz_j = (s_j - [j = i]) / tau, d(-log S_R/S)/dz_j = (s_j - [j in R] E_j / S_R) / tau)
    and the sampled tail's P_R sum_m w_m (log(p_m / P_R) - z_m / tau + log S_R) adds
        tau * P_R (sum_m w_m [j in R] E_j / S_R - sum_m w_m [j = d_m]).
    So the gradient is a e + b E + c E_R plus scatters at the kept ids, the draws and the label, with per-row
    a = (1 - alpha) / S1, b = alpha tau W / S, c = alpha tau P_R (sum_m w_m - 1) / S_R and E_R = E on R, 0 elsewhere:
    about eleven elementwise passes over [n, V] and no [n, V] bool mask but the supports' (one gather) when a
    micro-batch mixes teachers."""
    n, vocab = logits.shape
    tau, mode = settings.temperature, settings.missing_mass
    dtype = logits.dtype
    tail = targets.tail if mode == "support" else None
    if targets.tail is not None and mode != "support":
        raise ValueError("a sampled tail goes with missing_mass='support' only")
    ids, probs = teacher_probabilities(targets.topk_ids, targets.topk_logprobs, tau, mode, targets.log_partitions)
    kept = ids >= 0
    safe = ids.clamp(min=0)
    row_valid = kept.any(dim=1, keepdim=True)
    if mode == "renormalize":
        has_rest = None
    else:
        rest_size = vocab - kept.sum(dim=1, keepdim=True)
        if mode == "support":
            teacher = targets.teacher.unsqueeze(1)
            inside = targets.supports[teacher, safe] & kept  # kept ids the teacher can emit
            rest_size = vocabulary.support_sizes[teacher] - inside.sum(dim=1, keepdim=True)
        has_rest = rest_size > 0
    buckets = teacher_buckets(ids, probs, tau, mode, has_rest, dtype)
    kept_mask, kept_p, kept_logp = buckets.mask[:, : ids.shape[1]], buckets.p[:, : ids.shape[1]], buckets.logp
    labels = targets.labels.unsqueeze(1)
    scored = labels != -100  # cross_entropy's ignore_index
    labels = labels.clamp(min=0)

    # Forward: the few logits the losses name, then the exponentials at tau and at 1 around one shared maximum.
    z_kept = logits.gather(1, safe)
    z_label = logits.gather(1, labels)
    z_drawn = None if tail is None else logits.gather(1, tail.ids.clamp(min=0))
    top = logits.amax(dim=1, keepdim=True)
    logits.sub_(top)
    if tau == 1.0:
        work.copy_(logits)
    else:
        torch.mul(logits, 1.0 / tau, out=work)
    work.exp_()  # E
    logits.exp_()  # e
    s1 = logits.sum(dim=1, keepdim=True)
    e_kept = torch.where(kept, work.gather(1, safe), torch.zeros_like(z_kept))
    if mode == "renormalize":
        s_tau = work.sum(dim=1, keepdim=True)
        s_rest = None
    else:
        # E with the kept ids emptied (a dropped id's slot points at a kept id of its row, or at id 0 of a row
        # with none, whose KD and coefficients are 0): the sums over the rest then need no subtraction.
        first_kept = ids.gather(1, kept.int().argmax(dim=1, keepdim=True)).clamp(min=0)
        work.scatter_(1, torch.where(kept, ids, first_kept), 0.0)
        if mode == "rest":
            s_rest = work.sum(dim=1, keepdim=True)
            s_tau = s_rest + e_kept.sum(dim=1, keepdim=True)
        else:
            sums = work @ vocabulary.sums  # [n, 1 + teachers]: all but K, and each teacher's support less K
            s_tau = sums[:, :1] + e_kept.sum(dim=1, keepdim=True)
            s_rest = sums.gather(1, teacher + 1)
    log_s_tau = s_tau.log()
    log_z_tau = top / tau + log_s_tau
    mlm = torch.where(scored, top + s1.log() - z_label, torch.zeros_like(z_label)).squeeze(1)
    student_kept = z_kept / tau - log_z_tau
    terms = torch.where(kept_mask, kept_p * (kept_logp[:, : ids.shape[1]] - student_kept), torch.zeros_like(z_kept))
    kd = terms.sum(dim=1)
    redo = None
    if s_rest is not None:
        rest_mask = buckets.mask[:, -1:]
        trusted = rest_mask & (s_rest >= _SMALLEST_FUSED_REST)
        student_rest = torch.where(trusted, s_rest.clamp(min=torch.finfo(dtype).tiny).log() - log_s_tau, 0.0)
        rest_p, rest_logp = buckets.p[:, -1:], buckets.logp[:, -1:]
        kd = kd + torch.where(trusted, rest_p * (rest_logp - student_rest), 0.0).squeeze(1)
        if tail is not None:
            kd = kd + _sampled_rest(
                z_drawn / tau - log_z_tau,
                student_rest,
                buckets.rest_logp64,
                trusted,
                tail,
                tau,
                targets.log_partitions,
                targets.topk_logprobs,
            ).to(dtype)
        redo = (rest_mask & ~trusted).squeeze(1)
    kd = tau**2 * kd

    if want_grad:
        weight_kd = alpha * tau
        a = torch.where(scored, (1.0 - alpha) / s1, 0.0)
        b = weight_kd * (
            kept_p.sum(dim=1, keepdim=True) + (0.0 if s_rest is None else torch.where(trusted, rest_p, 0.0))
        )
        b = torch.where(row_valid, b / s_tau, 0.0)
        logits.mul_(a)  # a e
        corrections = -weight_kd * kept_p  # at the kept ids
        if s_rest is None:
            logits.addcmul_(work, b)  # b E
        else:
            tail_mass = torch.zeros_like(b)
            if tail is not None:
                drawn, share, _ = _tail_shares(
                    trusted, tail, tau, targets.log_partitions, targets.topk_logprobs, buckets.rest_logp64
                )
                tail_p = buckets.rest_logp64.exp() * share  # [n, M] float64: P_R w_m
                tail_mass = tail_p.sum(dim=1, keepdim=True).to(dtype)
            c = torch.where(trusted, weight_kd * (tail_mass - rest_p) / s_rest.clamp(min=_SMALLEST_FUSED_REST), 0.0)
            corrections = corrections + b * e_kept  # E at the kept ids, emptied from `work`
            if mode == "rest":
                logits.addcmul_(work, b + c)  # b E + c E_R, with E_R = work
            else:
                logits.addcmul_(work, b)
                # E_R: E times the 0/1 support of each run of one teacher's rows (the caller sorts them).
                first = 0
                runs, counts = torch.unique_consecutive(targets.teacher, return_counts=True)
                for teacher_id, count in zip(runs.tolist(), counts.tolist(), strict=True):
                    work[first : first + count].mul_(vocabulary.inside[teacher_id])
                    first += count
                logits.addcmul_(work, c)
            if tail is not None:
                logits.scatter_add_(1, tail.ids.clamp(min=0), -weight_kd * tail_p.to(dtype))
        logits.scatter_add_(1, safe, torch.where(kept, corrections, 0.0))
        logits.scatter_add_(1, labels, scored.to(dtype) * (alpha - 1.0))
    if redo is not None and bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        kd_rows, mlm_rows, grad_rows = exact(rows)
        kd[rows], mlm[rows] = kd_rows.to(dtype), mlm_rows.to(dtype)
        if want_grad:
            logits[rows] = grad_rows
    return kd, mlm


def alpha_at(step: int, settings: AlphaConfig, total_steps: int) -> float:
    """The KD weight alpha_t at optimizer step `step` (0-based)."""
    horizon = settings.steps or total_steps
    if settings.schedule == "constant":
        return settings.start
    if settings.schedule == "linear":
        return settings.start * max(1.0 - step / horizon, 0.0)
    return settings.start if step < horizon else 0.0
