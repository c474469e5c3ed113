"""One optimizer step of distillation from cached soft targets, the same whatever the number of ranks.

Every rank draws the step's examples (micro_batch × accumulation × world of them) and keeps its slices. The loss
is a mean over every masked position of the step, on all ranks and micro-batches together: each micro-batch's
sum is scaled by world × accumulation / (positions in the step), which DeepSpeed's averaging over ranks and
accumulation turns back into that mean. So 2 ranks with micro-batch m take the same step as 1 rank with 2m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdkd.pipeline.distill.config import LossConfig
from mdkd.pipeline.distill.losses import DistillationLoss, TailSample, Targets


@dataclass
class StepTotals:
    """Sums over a step's masked positions, per language: [languages, (loss, kd, mlm, positions, windows)], and
    tokens. Windows count what a student has seen of each language (its exposure, against its teachers')."""

    per_language: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, languages: int) -> StepTotals:
        return cls(torch.zeros(languages, 5, dtype=torch.float64), torch.zeros((), dtype=torch.float64))

    def all_reduce(self) -> None:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            packed = torch.cat([self.per_language.flatten(), self.tokens.view(1)])
            torch.distributed.all_reduce(packed)
            self.per_language = packed[:-1].view_as(self.per_language)
            self.tokens = packed[-1]

    def metrics(self, languages: list[str]) -> dict:
        totals = self.per_language.sum(dim=0)
        positions = max(totals[3].item(), 1.0)
        per_language = {
            language: {
                "loss": row[0].item() / max(row[3].item(), 1.0),
                "kd_loss": row[1].item() / max(row[3].item(), 1.0),
                "mlm_loss": row[2].item() / max(row[3].item(), 1.0),
                "masked_positions": int(row[3].item()),
                "windows": round(row[4].item()),
            }
            for language, row in zip(languages, self.per_language, strict=False)
            if row[3].item() > 0
        }
        return {
            "loss": totals[0].item() / positions,
            "kd_loss": totals[1].item() / positions,
            "mlm_loss": totals[2].item() / positions,
            "masked_positions": int(totals[3].item()),
            "windows": round(totals[4].item()),
            "per_language": per_language,
        }


@dataclass(frozen=True)
class Supports:
    """Each teacher's tokens in the student vocabulary, for the `support` loss: masks [teachers, V] on the device,
    rows in the order of `teachers`, and the temperature the cache's tail was drawn at (None: no tail)."""

    teachers: list[str]
    masks: torch.Tensor
    tail_temperature: float | None = None


def micro_batch_targets(batch: dict[str, torch.Tensor], supports: Supports | None) -> Targets:
    """The loss's targets from a collated batch on the device: the tail goes with `support` when the cache drew one."""
    tail = None
    if "tail_ids" in batch and supports is not None and supports.tail_temperature is not None:
        tail = TailSample(
            batch["tail_ids"],
            batch["tail_counts"],
            batch["tail_logprobs"],
            supports.tail_temperature,
            batch["tail_log_partitions"],
        )
    return Targets(
        batch["labels"],
        batch["topk_ids"],
        batch["topk_logprobs"],
        batch.get("log_partitions"),
        None if supports is None else batch["teacher"],
        None if supports is None else supports.masks,
        tail,
    )


def micro_batch_backward(
    engine,
    batch: dict[str, torch.Tensor],
    alpha: float,
    settings: LossConfig,
    scale: float,
    totals: StepTotals,
    supports: Supports | None = None,
) -> None:
    """Forward, both losses, backward for one collated micro-batch (`collate`, with the teachers of `supports`);
    adds its sums to `totals`. The student computes the losses itself, chunk by chunk (`projected_losses`)."""
    batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
    loss = DistillationLoss(micro_batch_targets(batch, supports), settings, alpha)
    total, kd, mlm = engine(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], loss=loss)
    engine.backward(total * scale)
    with torch.no_grad():
        # Each position adds 1 / (its window's masked positions): the window column sums to windows.
        window_share = 1.0 / torch.bincount(batch["rows"])[batch["rows"]].to(kd.dtype)
        per_position = torch.stack([(1.0 - alpha) * mlm + alpha * kd, kd, mlm, torch.ones_like(kd), window_share], 1)
        totals.per_language.index_add_(0, batch["language"].cpu(), per_position.double().cpu())
        totals.tokens += batch["attention_mask"].sum().item()
