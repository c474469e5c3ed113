"""Metrics at masked positions, for a student or any HF masked LM, and for teachers read from the cache.

Model metrics (on windows whose labels the model's vocabulary can spell):
- accuracy: the model's top-1 equals the original token;
- perplexity: exp(mean cross-entropy against the original token);
- agreement: the model's top-1 equals the teacher's top-1 (positions where the teacher's top-1 maps to a token);
- kl: KL(teacher top-k renormalised || model softmax) at temperature 1, the KD loss with tau = 1.

Teacher metrics come from the cache alone, no teacher compute: accuracy is top-1 == label; the teacher's
probability of the label is known only when the label is in its top-k, so its perplexity is reported as a lower
bound, counting a label outside the top-k as if it had the k-th probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mdkd.pipeline.distill.data import Example, ShardRows, collate, held_out
from mdkd.pipeline.distill.losses import kd_loss
from mdkd.pipeline.cache.shards import read_shard


@dataclass
class MetricSums:
    """Running sums; `result()` turns them into means. Sums add across batches, teachers and ranks."""

    positions: float = 0.0
    correct: float = 0.0
    nll: float = 0.0
    agreement_positions: float = 0.0
    agreements: float = 0.0
    kl: float = 0.0

    def add(self, other: "MetricSums") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> dict:
        if not self.positions:
            return {"positions": 0}
        result = {
            "positions": int(self.positions),
            "accuracy": self.correct / self.positions,
            "perplexity": float(np.exp(self.nll / self.positions)),
        }
        if self.agreement_positions:
            result["agreement"] = self.agreements / self.agreement_positions
            result["kl"] = self.kl / self.agreement_positions
        return result


def model_sums(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
               teacher_logprobs: torch.Tensor | None = None) -> MetricSums:
    """Sums for one batch. labels [N] (-1: the model cannot spell the label; left out), teacher_ids [N, k] in the
    model's ids (-1: no such token), teacher_logprobs [N, k]."""
    logits = logits.float()
    known = labels >= 0
    logp = torch.log_softmax(logits[known], dim=-1)
    predicted = logits.argmax(dim=-1)
    sums = MetricSums(
        positions=float(known.sum()),
        correct=float((predicted[known] == labels[known]).sum()),
        nll=float(-logp.gather(1, labels[known].unsqueeze(1)).sum()),
    )
    if teacher_ids is not None:
        comparable = teacher_ids[:, 0] >= 0
        sums.agreement_positions = float(comparable.sum())
        sums.agreements = float((predicted[comparable] == teacher_ids[comparable, 0]).sum())
        if comparable.any():
            sums.kl = float(kd_loss(logits[comparable], teacher_ids[comparable], teacher_logprobs[comparable], 1.0).sum())
    return sums


def teacher_sums(topk_ids: np.ndarray, topk_logprobs: np.ndarray, labels: np.ndarray) -> MetricSums:
    """A teacher's accuracy and perplexity lower bound from its cached top-k (all in the teacher's ids)."""
    hit = topk_ids == labels[:, None]
    label_logprob = np.where(hit.any(axis=1), (topk_logprobs * hit).sum(axis=1), topk_logprobs[:, -1])
    return MetricSums(positions=float(len(labels)), correct=float((topk_ids[:, 0] == labels).sum()),
                      nll=float(-label_logprob.astype(np.float64).sum()))


@dataclass
class HeldOutWindows:
    """Held-out cached rows of one (teacher, language), in the teacher's ids."""

    teacher: str
    language: str
    rows: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (input_ids, positions, labels, topk_ids, topk_logprobs)


def held_out_windows(cache_dir: Path, manifest: dict, teacher: str, language: str, is_held_out, limit: int | None,
                     top_k: int | None = None) -> HeldOutWindows:
    """Up to `limit` held-out rows of a (teacher, language), in cache order (deterministic)."""
    windows = HeldOutWindows(teacher, language)
    k = top_k or manifest["top_k"]
    for shard in manifest["shards"]:
        if shard["teacher"] != teacher or shard["language"] != language:
            continue
        doc_ids = read_shard(cache_dir / shard["path"], ["doc_id"]).column("doc_id").to_pylist()
        wanted = [i for i, doc_id in enumerate(doc_ids) if is_held_out(doc_id)]
        if not wanted:
            continue
        rows = ShardRows(cache_dir / shard["path"], k, manifest["top_k"])
        for index in wanted:
            windows.rows.append(rows.row(index))
            if limit is not None and len(windows.rows) >= limit:
                return windows
    return windows


def fraction_rule(fraction: float):
    return lambda doc_id: held_out(doc_id, fraction)


def score_windows(logits_fn, windows: HeldOutWindows, input_map: np.ndarray, target_map: np.ndarray,
                  batch_size: int = 32, pad_id: int = 0) -> tuple[MetricSums, MetricSums]:
    """(model sums, teacher sums) over held-out windows. `logits_fn(input_ids, attention_mask, rows, cols)` gives
    the model's logits at masked positions; `input_map` takes teacher ids to model ids ([UNK] where the model has
    no such token), `target_map` likewise but with -1, so labels and targets it cannot spell are left out."""
    model, teacher = MetricSums(), MetricSums()
    for start in range(0, len(windows.rows), batch_size):
        rows = windows.rows[start : start + batch_size]
        # Labels and targets go through target_map: what the model cannot spell is -1 and left out.
        examples = [Example(windows.language, input_map[ids].astype(np.int64), positions.astype(np.int64),
                            target_map[labels].astype(np.int64), target_map[topk_ids].astype(np.int64),
                            topk_logprobs.astype(np.float32))
                    for ids, positions, labels, topk_ids, topk_logprobs in rows]
        batch = collate(examples, [windows.language], pad_id)
        with torch.no_grad():
            logits = logits_fn(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"]).float().cpu()
        model.add(model_sums(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"]))
        teacher.add(teacher_sums(np.concatenate([r[3] for r in rows]), np.concatenate([r[4] for r in rows]),
                                 np.concatenate([r[2] for r in rows])))
    return model, teacher
