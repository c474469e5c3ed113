"""Distillation losses at masked positions, from cached top-k teacher predictions.

Per masked position, with the teacher's k' most probable tokens already mapped into the student vocabulary:

- Teacher probabilities at temperature 1 are read from the cache; ids that map to the same student token are
  summed; ids dropped by a vocabulary cap are removed.
- `renormalize`: q = the top-k' probabilities renormalised; q_tau ∝ q^(1/tau). With k' equal to the vocabulary
  this is exactly softmax(teacher logits / tau), so the loss equals the dense KD loss.
- `rest`: the probability outside the top-k' (and on dropped ids) is one more bucket, "rest", matched by the
  student's probability outside those tokens; q_tau ∝ q^(1/tau) over the k'+1 buckets.
- KD = tau^2 * KL(q_tau || student softmax(z / tau)) (Hinton et al.: tau^2 keeps gradient scale comparable).
- MLM = cross-entropy of the student (temperature 1) against the original token.
"""

from __future__ import annotations

import torch

from mdkd.pipeline.distill.config import AlphaConfig


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
    missing_mass: str = "renormalize",
) -> torch.Tensor:
    """Per-position KD loss [N] (see the module docstring). student_logits [N, V] (any float dtype, computed in
    fp32), teacher_ids [N, k] student ids or -1, teacher_logprobs [N, k] cached log-probabilities at tau = 1."""
    logits = student_logits.float() / temperature
    student_logp = torch.log_softmax(logits, dim=-1)
    ids, probs = merge_duplicates(teacher_ids, teacher_logprobs.float().exp())
    valid = ids >= 0
    gathered = student_logp.gather(1, ids.clamp(min=0))  # [N, k]
    log_tiny = torch.finfo(torch.float32).tiny
    if missing_mass == "rest":
        rest = 1.0 - probs.sum(dim=1, keepdim=True)
        # Below 1e-6 the "rest" is float32 rounding of a top-k that covers everything, not teacher mass.
        rest = torch.where(rest > 1e-6, rest, torch.zeros_like(rest))
        probs = torch.cat([probs, rest], dim=1)
        covered = torch.logsumexp(gathered.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
        student_rest = torch.log1p(-covered.exp().clamp(max=1 - 1e-7))  # log of the student's mass elsewhere
        gathered = torch.cat([gathered, student_rest], dim=1)
        valid = torch.cat([valid, rest > 0], dim=1)
    tempered = torch.where(valid, probs.clamp(min=log_tiny).log() / temperature, torch.full_like(probs, float("-inf")))
    teacher_logp = torch.log_softmax(tempered, dim=1)
    teacher_p = teacher_logp.exp()
    terms = torch.where(valid, teacher_p * (teacher_logp - gathered), torch.zeros_like(teacher_p))
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
