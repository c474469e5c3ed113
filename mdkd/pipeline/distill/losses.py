"""Distillation losses at masked positions, from cached top-k teacher predictions.

Per masked position the cache holds the teacher's k most probable tokens (already mapped into the student vocabulary,
-1 = dropped, e.g. by a vocabulary cap), their log-probabilities logp_i at temperature 1 (the teacher's full-vocabulary
log-softmax) and, per temperature tau, the tempered log-partition A_tau = logsumexp_j(logp_j / tau) over the teacher's
FULL vocabulary. Write s_tau = softmax(student logits / tau).

- `rest` (default, exact): the teacher's tempered probability of a cached id is q_i = exp(logp_i / tau - A_tau),
  exactly softmax(teacher logits / tau)_i. Ids mapped to the same student token are merged by summing these tempered
  q_i (merge after tempering). The KL is over k' + 1 buckets: the k' distinct kept student ids, plus "rest" =
  everything else (dropped ids included). Teacher rest = 1 - sum of the bucket q's, the teacher's exact tempered mass
  outside them; student rest = s_tau mass outside the bucket ids, computed stably as logsumexp of the student's
  z / tau over the vocabulary with the bucket ids masked out minus the full logsumexp (no 1 - sum cancellation).
  With every vocabulary id present the rest is empty and the loss is exactly the dense KD loss.
- `renormalize` (Knowledge Inheritance's top-K recipe): the tau = 1 probabilities of the kept ids are merged, then
  renormalised to q and tempered, q_tau ∝ q^(1/tau); the student side is s_tau at those ids. This teaches the student
  that everything outside the top-k has probability 0. `teacher_log_partition` is ignored.
- KD = tau^2 * KL(teacher buckets || student buckets) (Hinton et al.: tau^2 keeps gradient scale comparable).
- A position with no kept id (all -1) contributes loss 0 and gradient 0 in both modes; teacher-side quantities are
  sanitised before they meet the student so that masked-out entries cannot leak NaN into the gradient.
- MLM = cross-entropy of the student (temperature 1) against the original token.
"""

from __future__ import annotations

import torch

from mdkd.pipeline.distill.config import AlphaConfig

MISSING_MASS_MODES = ("rest", "renormalize")


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum probabilities of equal ids within each row; the later duplicates get probability 0 and id -1.

    ids: [N, k] student ids (-1 = no token), probs: [N, k]. Returns tensors of the same shapes.
    """
    valid = ids >= 0
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)  # [N, k, k]
    first = same.float().argmax(dim=2)  # the first column holding each id
    probs = torch.where(valid, probs, torch.zeros_like(probs))
    merged = torch.zeros_like(probs).scatter_add(1, first, probs)
    keep = valid & (first == torch.arange(ids.shape[1], device=ids.device))
    return torch.where(keep, ids, torch.full_like(ids, -1)), torch.where(keep, merged, torch.zeros_like(merged))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    missing_mass: str = "rest",
    teacher_log_partition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KD loss [N] (see the module docstring).

    student_logits [N, V] (any float dtype; computed in at least fp32), teacher_ids [N, k] student ids or -1,
    teacher_logprobs [N, k] cached teacher log-probabilities at tau = 1 (full-vocabulary log-softmax),
    teacher_log_partition [N] the cached A_tau = logsumexp(logp / tau) for this `temperature` (required in `rest`).
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
    if missing_mass == "rest":
        if teacher_log_partition is None:
            raise ValueError("missing_mass='rest' needs teacher_log_partition (A_tau for this temperature)")
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
        # Student mass outside the bucket ids: mask them out of the vocabulary (dropped ids go to a spare column).
        slot = torch.where(kept, ids, torch.full_like(ids, vocab))
        in_bucket = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, slot, True)[:, :vocab]
        has_rest = (~in_bucket & (logits > -torch.inf)).any(dim=1, keepdim=True)  # a non-empty, finite rest
        # Rows without a rest keep the full row, so logsumexp never sees only -inf and student_rest stays finite.
        rest_logits = logits.masked_fill(in_bucket & has_rest, -torch.inf)
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
    teacher_p = torch.where(mask, teacher_logp.exp(), torch.zeros_like(teacher_logp)).to(dtype)
    teacher_logp = teacher_logp.to(dtype)
    terms = torch.where(mask, teacher_p * (teacher_logp - student_logp), torch.zeros_like(student_logp))
    return temperature**2 * terms.sum(dim=1)


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [N] against the original tokens."""
    return torch.nn.functional.cross_entropy(student_logits.float(), labels, reduction="none")


def alpha_at(step: int, settings: AlphaConfig, total_steps: int) -> float:
    """The KD weight alpha_t at optimizer step `step` (0-based)."""
    horizon = settings.steps or total_steps
    if settings.schedule == "constant":
        return settings.start
    if settings.schedule == "linear":
        return settings.start * max(1.0 - step / horizon, 0.0)
    return settings.start if step < horizon else 0.0
