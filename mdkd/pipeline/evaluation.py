"""Metrics at masked positions, for a student or any HF masked LM, and for teachers read from the cache.

A model and a teacher are compared on exactly the same positions: those of the teacher's held-out windows whose
label the model's vocabulary can spell. A position whose label it cannot spell is left out of both sides and
counted (`left_out`), so the two accuracies share one denominator. Every comparison is also split by what stage
one's masking did at the position (`KINDS`): replaced by the mask token, replaced by a random token, or kept
unchanged (the cached input there is the label itself, a random draw of the original included).

Model metrics:
- accuracy: the model's top-1 equals the original token;
- perplexity: exp(mean cross-entropy against the original token);
- agreement: the model's top-1 equals the teacher's top-1 (positions where the teacher's top-1 maps to a token);
- kl: the exact KL at temperature 1 between teacher and model over the teacher's top-k tokens, one bucket for the
  rest of the teacher's own tokens, and the model's tokens the teacher cannot emit (teacher mass 0) (at tau = 1
  the teacher's log-partition is 0, so every cache has what this needs);
- outside_mass: the model's probability (temperature 1) on tokens the teacher cannot emit: what a model that has
  learnt this teacher's distribution puts nowhere;
- topk_mass_tau<T>: the model's probability at temperature T on the teacher's top-k tokens (for every
  temperature the cache recorded), to hold against the teacher's own figure: a student that matches its teacher
  puts the same share of its mass there.

Teacher metrics come from the cache alone, no teacher compute: accuracy is top-1 == label; the teacher's
probability of the label is known only when the label is in its top-k, so its perplexity is reported as a lower
bound, counting a label outside the top-k as if it had the k-th probability; topk_mass_tau<T> is exact, from the
cached tempered log-partitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import CachedPredictions
from mdkd.pipeline.distill.data import Example, collate
from mdkd.pipeline.distill.losses import kd_loss, teacher_buckets, teacher_probabilities


@dataclass
class MetricSums:
    """Running sums; `result()` turns them into means. Sums add across batches, teachers and ranks."""

    positions: float = 0.0
    correct: float = 0.0
    nll: float = 0.0
    agreement_positions: float = 0.0
    agreements: float = 0.0
    kl: float = 0.0
    outside_mass: float = 0.0
    topk_mass: dict[float, float] = field(default_factory=dict)  # temperature -> summed tempered top-k mass

    def add(self, other: MetricSums) -> None:
        for name in self.__dataclass_fields__:
            if name != "topk_mass":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        for tau, mass in other.topk_mass.items():
            self.topk_mass[tau] = self.topk_mass.get(tau, 0.0) + mass

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
            result["outside_mass"] = self.outside_mass / self.agreement_positions
        for tau, mass in sorted(self.topk_mass.items()):
            result[f"topk_mass_tau{tau:g}"] = mass / self.positions
        return result


@dataclass
class PositionMetrics:
    """A model's figures at each masked position of one batch ([N] each), summed over any subset by `sums`.

    known: the label can be spelled (the position is scored); correct and nll: top-1 equals the label, and the
    cross-entropy there; comparable: the teacher's top-1 maps to a model token (agreement, kl, outside_mass count
    there); topk_mass: temperature -> the model's tempered mass on the teacher's top-k tokens."""

    known: torch.Tensor
    correct: torch.Tensor
    nll: torch.Tensor
    comparable: torch.Tensor | None = None
    agrees: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    outside: torch.Tensor | None = None
    topk_mass: dict[float, torch.Tensor] = field(default_factory=dict)

    def sums(self, where: torch.Tensor | None = None) -> MetricSums:
        """Sums over the positions `where` ([N] bool; None: every position)."""
        chosen = torch.ones_like(self.known) if where is None else where
        scored = chosen & self.known

        def total(values: torch.Tensor, mask: torch.Tensor) -> float:
            return float(values.double()[mask].sum())

        sums = MetricSums(
            positions=float(scored.sum()), correct=total(self.correct, scored), nll=total(self.nll, scored)
        )
        if self.comparable is not None:
            compared = chosen & self.comparable
            sums.agreement_positions = float(compared.sum())
            sums.agreements = total(self.agrees, compared)
            sums.kl = total(self.kl, compared)
            sums.outside_mass = total(self.outside, compared)
        sums.topk_mass = {tau: total(mass, scored) for tau, mass in self.topk_mass.items()}
        return sums


def position_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    temperatures: list[float] = (),
    support: torch.Tensor | None = None,
) -> PositionMetrics:
    """Each position's figures. labels [N] (-1: the model cannot spell the label; not scored), teacher_ids [N, k] in
    the model's ids (-1: no such token), teacher_logprobs [N, k] at temperature 1; top-k masses at each of
    `temperatures`; `support` [model vocabulary] bool, the model's tokens the teacher can emit, which hold every
    teacher id (needed with teacher_ids).

    Held-out scoring runs this every few steps, so the vocabulary-wide work is a few passes over [N, V]: one
    maximum, the exponentials, and (with a teacher) one product of the exponentials, the teacher's kept tokens
    emptied, with [support | not support], which gives the rest bucket and the mass the teacher cannot emit as sums
    of the same positive terms (nothing cancels). The KL is kd_loss's exact `support` KL at temperature 1 (tested
    against a dense reference); a row whose rest underflows the row's maximum goes through kd_loss itself."""
    logits = logits.float()
    known = labels >= 0
    top, predicted = logits.max(dim=1)
    exps = torch.exp(logits - top.unsqueeze(1))  # [N, V] in (0, 1]
    label_logits = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    metrics = PositionMetrics(known, (predicted == labels) & known, torch.zeros(len(labels)))
    if teacher_ids is None:
        metrics.nll = torch.where(known, top + exps.sum(dim=1).log() - label_logits, 0.0)
        return metrics
    # The teacher's side is the loss's own: each model token once, however many teacher ids map to it (ids the
    # model lacks add nothing), at tau = 1, where the teacher's log-partition is 0.
    ids, teacher_p = teacher_probabilities(teacher_ids, teacher_logprobs, 1.0, "support", torch.zeros(len(labels)))
    kept = ids >= 0
    safe_ids = ids.clamp(min=0)
    kept_exps = torch.where(kept, exps.gather(1, safe_ids), 0.0)
    rows, columns = kept.nonzero(as_tuple=True)
    exps[rows, ids[rows, columns]] = 0.0
    rest, outside = (exps @ torch.stack([support, ~support], dim=1).to(exps.dtype)).unbind(dim=1)
    total = kept_exps.sum(dim=1) + rest + outside
    log_z = top + total.log()
    metrics.nll = torch.where(known, log_z - label_logits, 0.0)
    metrics.comparable = teacher_ids[:, 0] >= 0
    metrics.agrees = predicted == teacher_ids[:, 0]
    metrics.outside = outside / total
    has_rest = int(support.sum()) - kept.sum(dim=1, keepdim=True) > 0
    buckets = teacher_buckets(ids, teacher_p, 1.0, "support", has_rest, torch.float64)
    kept_logits = logits.gather(1, safe_ids)
    student_logp = torch.cat(
        [kept_logits - log_z.unsqueeze(1), (rest.log() - total.log()).unsqueeze(1)],  # exps are relative to the max
        dim=1,
    ).double()
    kl = torch.where(buckets.mask, buckets.p * (buckets.logp - student_logp), 0.0).sum(dim=1)
    underflow = buckets.mask[:, -1] & (rest == 0) & metrics.comparable
    if underflow.any():
        chosen = underflow.nonzero().squeeze(1)
        kl[chosen] = kd_loss(
            logits[chosen],
            teacher_ids[chosen],
            teacher_logprobs[chosen],
            1.0,
            missing_mass="support",
            teacher_log_partition=torch.zeros(len(chosen)),
            support=support.unsqueeze(0).expand(len(chosen), -1),
        ).double()
    metrics.kl = kl
    for tau in temperatures:
        if tau == 1.0:
            metrics.topk_mass[tau] = kept_exps.sum(dim=1) / total
        else:
            tempered_top = torch.where(kept, torch.exp((kept_logits - top.unsqueeze(1)) / tau), 0.0)
            metrics.topk_mass[tau] = tempered_top.sum(dim=1) / torch.exp((logits - top.unsqueeze(1)) / tau).sum(dim=1)
    return metrics


def teacher_sums(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    labels: np.ndarray,
    log_partitions: np.ndarray | None = None,
    temperatures: list[float] = (),
) -> MetricSums:
    """A teacher's accuracy, perplexity lower bound and tempered top-k masses from its cache; `topk_ids` and
    `labels` in one id space where each token has one id (a model's, so a label counts as predicted when it is a
    twin of the cached token); `log_partitions` [N, temperatures] are the cached ones (None in a schema-1 cache:
    no masses)."""
    hit = topk_ids == labels[:, None]
    label_logprob = np.where(hit.any(axis=1), (topk_logprobs * hit).sum(axis=1), topk_logprobs[:, -1])
    sums = MetricSums(
        positions=float(len(labels)),
        correct=float((topk_ids[:, 0] == labels).sum()),
        nll=float(-label_logprob.astype(np.float64).sum()),
    )
    if log_partitions is not None:
        logprobs = topk_logprobs.astype(np.float64)
        for column, tau in enumerate(temperatures):
            sums.topk_mass[tau] = float(np.exp(logprobs / tau - log_partitions[:, column : column + 1]).sum())
    return sums


@dataclass
class HeldOutWindows:
    """Held-out cached rows of one (teacher, language), in the teacher's ids."""

    teacher: str
    language: str
    rows: list[CachedPredictions] = field(default_factory=list)


def held_out_windows(
    cache: CacheReader,
    teacher: str,
    language: str,
    is_held_out: Callable[[str], bool],
    limit: int | None,
    top_k: int | None = None,
) -> HeldOutWindows:
    """Up to `limit` held-out rows of a (teacher, language), in cache order (deterministic)."""
    return HeldOutWindows(teacher, language, list(cache.select_rows(teacher, language, is_held_out, limit, top_k)))


KINDS = ("mask", "random", "keep")  # what stage one's masking did at a position


def position_kinds(inputs: np.ndarray, labels: np.ndarray, mask_id: int | None) -> np.ndarray:
    """Index into KINDS per position, from the cached input there (teacher ids): the teacher's mask token is
    "mask", the label itself is "keep" (a random draw that hit the original included), anything else "random"."""
    kinds = np.full(len(labels), KINDS.index("random"), dtype=np.int64)
    kinds[inputs == labels] = KINDS.index("keep")
    if mask_id is not None:
        kinds[inputs == mask_id] = KINDS.index("mask")
    return kinds


@dataclass
class Comparison:
    """A model and a teacher on the same positions of the teacher's windows, split by position kind; `left_out`
    counts the positions left out of both (label not in the model's vocabulary), `unk_labels` the scored
    positions whose label is the teacher's unknown token, `unknown_inputs` / `input_tokens` the window tokens the
    model could not spell (they reached it as its [UNK])."""

    model: dict[str, MetricSums] = field(default_factory=lambda: {kind: MetricSums() for kind in KINDS})
    teacher: dict[str, MetricSums] = field(default_factory=lambda: {kind: MetricSums() for kind in KINDS})
    left_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unk_labels: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unknown_inputs: int = 0
    input_tokens: int = 0

    def add(self, other: Comparison) -> None:
        for kind in KINDS:
            self.model[kind].add(other.model[kind])
            self.teacher[kind].add(other.teacher[kind])
            self.left_out[kind] += other.left_out[kind]
            self.unk_labels[kind] += other.unk_labels[kind]
        self.unknown_inputs += other.unknown_inputs
        self.input_tokens += other.input_tokens

    def totals(self) -> tuple[MetricSums, MetricSums]:
        """(model, teacher) sums over every kind: the same positions on both sides."""
        model, teacher = MetricSums(), MetricSums()
        for kind in KINDS:
            model.add(self.model[kind])
            teacher.add(self.teacher[kind])
        return model, teacher

    def result(self) -> dict:
        model, teacher = self.totals()
        result = _side_by_side(model, teacher, sum(self.left_out.values()), sum(self.unk_labels.values()))
        if self.input_tokens:
            result["unknown_input_share"] = self.unknown_inputs / self.input_tokens
        result["by_kind"] = {
            kind: _side_by_side(self.model[kind], self.teacher[kind], self.left_out[kind], self.unk_labels[kind])
            for kind in KINDS
        }
        return result


def _side_by_side(model: MetricSums, teacher: MetricSums, left_out: int, unk_labels: int) -> dict:
    result = {
        "positions": int(model.positions),
        "left_out": int(left_out),
        "unk_labels": int(unk_labels),
        "model": model.result(),
        "teacher": teacher.result(),
    }
    if model.positions and teacher.correct:
        result["accuracy_ratio"] = model.correct / teacher.correct  # same denominator: the ratio of the accuracies
    return result


def score_windows(
    logits_fn,
    windows: HeldOutWindows,
    input_map: np.ndarray,
    target_map: np.ndarray,
    temperatures: list[float],
    batch_size: int = 32,
    pad_id: int = 0,
) -> tuple[MetricSums, MetricSums]:
    """(model sums, teacher sums) over held-out windows, both on the same positions (see `compare_on_windows`)."""
    return compare_on_windows(
        logits_fn, windows, input_map, target_map, temperatures, None, batch_size, pad_id
    ).totals()


def compare_on_windows(
    logits_fn,
    windows: HeldOutWindows,
    input_map: np.ndarray,
    target_map: np.ndarray,
    temperatures: list[float],
    mask_id: int | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
    unk_id: int | None = None,
) -> Comparison:
    """The model against the teacher on the teacher's held-out windows, position for position.

    `logits_fn(input_ids, attention_mask, rows, cols)` gives the model's logits at masked positions; `input_map`
    takes teacher ids to model ids ([UNK] where the model has no such token), `target_map` likewise but with -1.
    A position whose label maps to -1 is left out of both the model's and the teacher's sums; the teacher's
    top-k ids the model cannot spell count for nothing on the model's side. `mask_id` (the teacher's) and the
    cached inputs say each position's kind; `unk_id` (the teacher's) counts labels that are its unknown token."""
    comparison = Comparison()
    support = None  # the model's tokens the teacher can emit, once the model's vocabulary size is known
    # Windows of like length together: a batch is padded to its longest window, and held-out windows run from a
    # few tokens to max_length (in the cache's order about a third of a batch's tokens were padding; the demo's
    # scoring took 13 % less time sorted). Every figure is a sum over positions, so the order moves only the last
    # bits: the sums' rounding, and float32 logits computed in batches of another shape. sorted() is stable.
    order = sorted(range(len(windows.rows)), key=lambda index: len(windows.rows[index].input_ids))
    for start in range(0, len(order), batch_size):
        rows = [windows.rows[index] for index in order[start : start + batch_size]]
        examples = [
            Example.from_cached(windows.language, cached, input_map, target_map, target_map, None) for cached in rows
        ]
        batch = collate(examples, [windows.language], pad_id)
        with torch.no_grad():
            logits = logits_fn(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"]).float().cpu()
        if support is None:
            support = torch.zeros(logits.shape[1], dtype=torch.bool)
            support[torch.from_numpy(target_map[target_map >= 0].astype(np.int64))] = True
        metrics = position_metrics(
            logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], temperatures, support
        )
        labels = np.concatenate([r.labels for r in rows])
        kinds = position_kinds(np.concatenate([r.input_ids[r.positions] for r in rows]), labels, mask_id)
        known = metrics.known.numpy()
        topk_ids = np.concatenate([r.topk_ids for r in rows])
        topk_logprobs = np.concatenate([r.topk_logprobs for r in rows])
        partitions = None if rows[0].log_partitions is None else np.concatenate([r.log_partitions for r in rows])
        comparison.input_tokens += sum(len(r.input_ids) for r in rows)
        comparison.unknown_inputs += int(sum((target_map[r.input_ids] < 0).sum() for r in rows))
        for index, kind in enumerate(KINDS):
            here = kinds == index
            scored = here & known
            comparison.left_out[kind] += int((here & ~known).sum())
            if unk_id is not None:
                comparison.unk_labels[kind] += int((labels[scored] == unk_id).sum())
            if not scored.any():
                continue
            comparison.model[kind].add(metrics.sums(torch.from_numpy(scored)))
            comparison.teacher[kind].add(
                # In the model's ids, where a teacher's twins are one token: the cache names a token by its
                # smallest id, the label by the id the text had, and `.` is right for a label `##.`.
                teacher_sums(
                    target_map[topk_ids[scored]],
                    topk_logprobs[scored],
                    target_map[labels[scored]],
                    None if partitions is None else partitions[scored],
                    temperatures,
                )
            )
    return comparison
