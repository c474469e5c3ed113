"""Training examples from the cache: which rows, in what order, mapped into the student vocabulary.

- A (teacher, language) pair is a *stream* over that teacher's shards of that language. Each epoch visits the
  shards in a seeded random order and the rows of a shard in a seeded random order, holding one shard in memory
  at a time, so memory does not grow with the cache.
- Documents held out by `cache.documents.held_out` (their `doc_id` hashes below `eval_fraction`): no stream
  ever yields them.
- Example g of the run draws its language (p(l) ∝ n_l^a) and, for a language with several teachers, its
  teacher from a generator seeded by (seed, g) alone; then takes the next row of that stream. The sampler's
  state is a few integers, saved in every checkpoint, so a resumed run continues with exactly the same data.
- Every rank draws the same examples for a step and keeps its own slice, so the data a step sees does not depend
  on how many ranks share it.
- `StepLoader` draws, maps and collates the next step's micro-batches on a thread while the current step trains,
  so reading Parquet (a whole shard when a stream moves on) and collation never make a step wait.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mdkd.pipeline.background import prefetch
from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.cache.manifest import ShardEntry
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import CachedPredictions, ShardRows
from mdkd.pipeline.seeding import SeededGenerator, pcg64_starts


@dataclass
class Example:
    """One cached row, mapped into the student vocabulary; top-k truncated to k'."""

    language: str
    input_ids: np.ndarray  # [T] student ids
    positions: np.ndarray  # [n]
    labels: np.ndarray  # [n] student ids
    topk_ids: np.ndarray  # [n, k'] student ids, -1 where the token was dropped by the vocabulary cap
    topk_logprobs: np.ndarray  # [n, k'] teacher log-probabilities at temperature 1
    log_partitions: np.ndarray | None  # [n] the teacher's tempered log-partition at the loss's temperature
    teacher: str = ""  # whose predictions these are (the loss's support is that teacher's tokens)
    tail_ids: np.ndarray | None = None  # [n, M] student ids drawn outside the top-k (-1: padding or none)
    tail_counts: np.ndarray | None = None  # [n, M] how often each was drawn
    tail_logprobs: np.ndarray | None = None  # [n, M] their teacher log-probabilities at temperature 1
    tail_log_partitions: np.ndarray | None = None  # [n] the teacher's log-partition at the draws' temperature

    @classmethod
    def from_cached(
        cls,
        language: str,
        cached: CachedPredictions,
        input_map: np.ndarray,
        label_map: np.ndarray,
        target_map: np.ndarray,
        temperature_column: int | None,
        teacher: str = "",
        tail_column: int | None = None,
    ) -> Example:
        """Map a cached row (teacher ids) into student ids: inputs through `input_map`, labels through `label_map`,
        top-k ids and tail draws through `target_map` (-1 for a token the student lacks); keep the log-partition
        of one cached temperature (None: none), and with `tail_column` the draws and the log-partition at the
        temperature they were drawn at."""
        partitions = None if temperature_column is None else cached.log_partitions[:, temperature_column]
        tail = {}
        if tail_column is not None:
            drawn = cached.tail_ids >= 0
            tail = {
                "tail_ids": np.where(drawn, target_map[cached.tail_ids.clip(min=0)], -1).astype(np.int64),
                "tail_counts": cached.tail_counts,
                "tail_logprobs": cached.tail_logprobs,
                "tail_log_partitions": cached.log_partitions[:, tail_column],
            }
        return cls(
            language,
            input_map[cached.input_ids].astype(np.int64),
            cached.positions.astype(np.int64),
            label_map[cached.labels].astype(np.int64),
            target_map[cached.topk_ids].astype(np.int64),
            cached.topk_logprobs,
            partitions,
            teacher,
            **tail,
        )


class Stream:
    """The training rows of one (teacher, language), epoch after epoch, in a seeded order."""

    def __init__(
        self,
        cache: CacheReader,
        teacher: str,
        language: str,
        seed: int,
        eval_fraction: float,
        top_k: int,
        temperature_column: int | None,
        input_map: np.ndarray,
        target_map: np.ndarray,
        tail_column: int | None = None,
    ):
        self.cache, self.teacher, self.language = cache, teacher, language
        self.tail_column = tail_column  # which log-partition the sampled tail was drawn at (None: no tail)
        self.shards: list[ShardEntry] = cache.manifest.shards_of(teacher, language)
        self.seed, self.eval_fraction, self.top_k = seed, eval_fraction, top_k
        self.temperature_column = temperature_column
        self.input_map, self.target_map = input_map, target_map
        self.epoch = self.shard_position = self.row_position = 0
        self._training_rows: dict[int, np.ndarray] = {}
        self._loaded: tuple[int, ShardRows] | None = None
        self._tag = int.from_bytes(hashlib.blake2b(self.key.encode(), digest_size=4).digest(), "little")
        # The latest permutation asked for of each kind, (epoch) for the shards and (epoch, shard) for a shard's
        # rows: each is asked for again for every row drawn.
        self._permutations: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}

    @property
    def key(self) -> str:
        return f"{self.teacher}/{self.language}"

    def training_rows(self, shard_index: int) -> np.ndarray:
        """Row indices of a shard whose documents are not held out (reads only the doc_id column)."""
        if shard_index not in self._training_rows:
            self._training_rows[shard_index] = self.cache.matching_rows(
                self.shards[shard_index], lambda doc_id: not held_out(doc_id, self.eval_fraction)
            )
        return self._training_rows[shard_index]

    def _permutation(self, size: int, *parts: int) -> np.ndarray:
        """The seeded permutation for (epoch) or (epoch, shard)."""
        kept = self._permutations.get(len(parts))
        if kept is None or kept[0] != parts:
            kept = (parts, np.random.default_rng([self.seed, self._tag, *parts]).permutation(size))
            self._permutations[len(parts)] = kept
        return kept[1]

    def next_row(self) -> tuple[int, int]:
        """Advance to the next training row; returns (shard index, row index)."""
        for _ in range(2 * len(self.shards) + 1):
            if self.shard_position >= len(self.shards):
                self.epoch, self.shard_position, self.row_position = self.epoch + 1, 0, 0
                continue
            shard = int(self._permutation(len(self.shards), self.epoch)[self.shard_position])
            rows = self.training_rows(shard)
            if self.row_position >= len(rows):
                self.shard_position, self.row_position = self.shard_position + 1, 0
                continue
            row = int(rows[self._permutation(len(rows), self.epoch, shard)[self.row_position]])
            self.row_position += 1
            return shard, row
        raise RuntimeError(f"stream {self.key} has no training rows (all its documents are held out?)")

    def example(self, shard: int, row: int) -> Example:
        if self._loaded is None or self._loaded[0] != shard:
            rows = self.cache.rows(self.shards[shard], self.top_k, tail=self.tail_column is not None)
            self._loaded = (shard, rows)
        cached = self._loaded[1].row(row)
        return Example.from_cached(
            self.language,
            cached,
            self.input_map,
            self.input_map,
            self.target_map,
            self.temperature_column,
            self.teacher,
            self.tail_column,
        )

    def state(self) -> list[int]:
        return [self.epoch, self.shard_position, self.row_position]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.shard_position, self.row_position = state


class Sampler:
    """Draws the run's examples in a fixed order; its state is (next example index, every stream's cursor)."""

    def __init__(
        self,
        streams: dict[str, Stream],
        language_probabilities: dict[str, float],
        teacher_weights: dict[str, dict[str, float]],
        seed: int,
    ):
        self.streams, self.seed = streams, seed
        self.languages = list(language_probabilities)
        self.language_p = np.array([language_probabilities[language] for language in self.languages])
        self.teachers = {language: list(teacher_weights[language]) for language in self.languages}
        self.teacher_p = {
            language: np.array(list(w.values())) / sum(w.values()) for language, w in teacher_weights.items()
        }
        self.next_example = 0

    def draw(self, count: int) -> list[Example]:
        examples = []
        indices = range(self.next_example, self.next_example + count)
        generator = SeededGenerator()  # example i draws from default_rng([seed, i]), without building one per example
        for start in pcg64_starts([[self.seed, index] for index in indices]):
            rng = generator.at(start)
            language = self.languages[rng.choice(len(self.languages), p=self.language_p)]
            teacher = self.teachers[language][rng.choice(len(self.teachers[language]), p=self.teacher_p[language])]
            stream = self.streams[f"{teacher}/{language}"]
            examples.append(stream.example(*stream.next_row()))
        self.next_example += count
        return examples

    def state(self) -> dict:
        return {"next_example": self.next_example, "streams": {k: s.state() for k, s in self.streams.items()}}

    def restore(self, state: dict) -> None:
        self.next_example = state["next_example"]
        for key, cursor in state["streams"].items():
            self.streams[key].restore(cursor)


def language_probabilities(sizes: dict[str, int], exponent: float) -> dict[str, float]:
    """p(l) ∝ n_l^a: a = 1 samples by size, a = 0 uniformly; mBERT's 0.7 favours small languages."""
    weights = {language: float(n) ** exponent for language, n in sizes.items()}
    total = sum(weights.values())
    return {language: w / total for language, w in weights.items()}


def collate(
    examples: list[Example], languages: list[str], pad_id: int = 0, teachers: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """A padded student batch; everything about masked positions is flat over the batch ([N, ...]). With
    `teachers`, each position's teacher too (its index there), and the sampled tails when every example has one."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.from_numpy(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    counts = [len(e.positions) for e in examples]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "rows": torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(counts)),
        "cols": torch.from_numpy(np.concatenate([e.positions for e in examples])),
        "labels": torch.from_numpy(np.concatenate([e.labels for e in examples])),
        "topk_ids": torch.from_numpy(np.concatenate([e.topk_ids for e in examples])),
        "topk_logprobs": torch.from_numpy(np.concatenate([e.topk_logprobs for e in examples])),
        "language": torch.repeat_interleave(
            torch.tensor([languages.index(e.language) for e in examples]), torch.tensor(counts)
        ),
    }
    if all(e.log_partitions is not None for e in examples):
        batch["log_partitions"] = torch.from_numpy(np.concatenate([e.log_partitions for e in examples]))
    if teachers is not None:
        batch["teacher"] = torch.repeat_interleave(
            torch.tensor([teachers.index(e.teacher) for e in examples]), torch.tensor(counts)
        )
    if all(e.tail_ids is not None for e in examples):
        for field in ("tail_ids", "tail_counts", "tail_logprobs", "tail_log_partitions"):
            batch[field] = torch.from_numpy(np.concatenate([getattr(e, field) for e in examples]))
    return batch


def rank_micro_batches(
    examples: list[Example], rank: int, world: int, micro: int, accumulation: int
) -> list[list[Example]]:
    """This rank's `accumulation` micro-batches out of the step's examples (micro-batch j of rank r is the slice
    (j * world + r) of size `micro`)."""
    return [examples[(j * world + rank) * micro : (j * world + rank + 1) * micro] for j in range(accumulation)]


@dataclass
class StepBatches:
    """One optimizer step's data on this rank: its collated micro-batches, the masked positions of the whole step
    (every rank's, which normalise the loss) and the sampler's state once the step's examples are drawn (what a
    checkpoint after this step saves)."""

    micro_batches: list[dict[str, torch.Tensor]]
    positions: int
    sampler_state: dict


class StepLoader:
    """The next `steps` steps' batches, prepared one step ahead on a thread (`background.prefetch`); `next()`
    returns them in order.

    Only the thread touches the sampler once the first step is asked for, so restore the sampler first. The
    examples and their order are the sampler's, whatever the timing; a failure on the thread is raised by
    `next()`."""

    def __init__(
        self,
        sampler: Sampler,
        steps: int,
        micro: int,
        accumulation: int,
        rank: int,
        world: int,
        teachers: list[str] | None = None,
        pin_memory: bool = False,
    ):
        self._steps = prefetch(
            _step_batches(sampler, steps, micro, accumulation, rank, world, teachers, pin_memory), wait_on_close=True
        )

    def next(self) -> StepBatches:
        return next(self._steps)

    def close(self) -> None:
        """Stop preparing steps: returns once the thread has finished the step it was preparing."""
        self._steps.close()


def _step_batches(sampler, steps, micro, accumulation, rank, world, teachers, pin_memory) -> Iterator[StepBatches]:
    for _ in range(steps):
        examples = sampler.draw(micro * accumulation * world)
        batches = []
        for mine in rank_micro_batches(examples, rank, world, micro, accumulation):
            batch = collate(mine, sampler.languages, teachers=teachers)
            batches.append({k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch)
        yield StepBatches(batches, sum(len(e.positions) for e in examples), sampler.state())
