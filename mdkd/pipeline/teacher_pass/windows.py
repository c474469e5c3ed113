"""From documents to masked, length-bucketed teacher batches, and from teacher outputs back to shard rows.

A unit of work is a block of consecutive documents of one language for one teacher. Its rows are written in
(document, window, copy) order whatever order the batches ran in, and its batches depend only on the unit and
the batch settings; so with the same settings a recomputed unit after a crash is the same bytes as the lost
one. (Other batch settings change the log-probabilities in the last bits, as padding changes the arithmetic.)

The host's share (`prepare_unit`, `plan_batches`) runs in stage one's worker processes and works on a unit's
flat arrays (`UnitRows`), not row by row; the teacher's share (`score_unit`) runs in the main process.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mdkd.pipeline.cache.shards import CachedRow, TeacherPredictions, UnitRows, offsets_of
from mdkd.pipeline.seeding import SeededGenerator, pcg64_starts
from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker, window_seed


@dataclass
class PreparedUnit:
    rows: UnitRows  # in (document, window, copy) order
    windows_without_tokens: int
    tokens: int


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[i], starts[i] + lengths[i]) laid end to end: each element's range i and its index."""
    which = np.repeat(np.arange(len(lengths)), lengths)
    offsets = offsets_of(lengths)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return which, np.repeat(np.asarray(starts), lengths) + within


def prepare_unit(documents: list[Document], tokenizer, masker: Masker, max_length: int, copies: int) -> PreparedUnit:
    """Split each document into consecutive windows of at most `max_length` tokens (special tokens included;
    no text is dropped) and mask `copies` independent copies of each window."""
    encoded = tokenizer(
        [document.text for document in documents],
        max_length=max_length,
        truncation=True,
        return_overflowing_tokens=True,
        stride=0,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), dtype=np.int32, count=total)
    special = np.fromiter(itertools.chain.from_iterable(encoded["special_tokens_mask"]), dtype=np.int8, count=total)
    # A window's index counts the document's windows before it, in the order the tokenizer gave them.
    sample = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    by_document = np.argsort(sample, kind="stable")
    window = np.empty(len(sample), dtype=np.int64)
    window[by_document] = np.arange(len(sample)) - np.searchsorted(sample[by_document], sample[by_document])
    # A window with no ordinary token (e.g. a line of control characters the normaliser removes) has nothing to
    # predict: it is counted and dropped.
    ordinary = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[special == 0], minlength=len(lengths))
    kept = np.flatnonzero(ordinary > 0)
    # Row r is copy r % copies of kept window r // copies.
    row_window = np.repeat(kept, copies)
    row_copy = np.tile(np.arange(copies, dtype=np.int32), len(kept))
    row_lengths = lengths[row_window]
    _, source = _ranges(offsets_of(lengths)[row_window], row_lengths)
    doc_ids = [documents[s].doc_id for s in sample[row_window].tolist()]
    windows = window[row_window].astype(np.int32)
    input_offsets = offsets_of(row_lengths)
    seeds = [
        window_seed(masker.settings.seed, d, w, c)
        for d, w, c in zip(doc_ids, windows.tolist(), row_copy.tolist(), strict=True)
    ]
    masked = masker.mask(ids[source], special[source], input_offsets, seeds)
    rows = UnitRows(
        doc_ids,
        windows,
        row_copy,
        masked.input_ids,
        input_offsets,
        masked.positions,
        masked.position_offsets,
        masked.labels,
    )
    return PreparedUnit(rows, int(len(lengths) - len(kept)), int(row_lengths.sum()))


def length_batches(lengths: list[int], batch_tokens: int | None, batch_size: int | None) -> list[list[int]]:
    """Group window indices of similar length: `batch_size` windows each, or (when it is not set) as many as
    fit in `batch_tokens` padded tokens. Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = lengths[index]
        if batch_size is not None:
            full = len(current) >= batch_size
        else:
            full = (len(current) + 1) * max(longest, length) > (batch_tokens or 0)
        if current and full:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def padded_inputs(rows: list[CachedRow], pad_id: int):
    """Padded input ids, attention mask, and the (row, column) of every masked position in the batch."""
    longest = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    batch_rows, cols = [], []
    for index, row in enumerate(rows):
        ids = torch.from_numpy(row.input_ids.astype(np.int64))
        input_ids[index, : len(ids)] = ids
        attention_mask[index, : len(ids)] = 1
        batch_rows.append(np.full(len(row.positions), index))
        cols.append(row.positions)
    return (
        input_ids,
        attention_mask,
        torch.from_numpy(np.concatenate(batch_rows)),
        torch.from_numpy(np.concatenate(cols)),
    )


@dataclass
class Batch:
    """One forward pass: the inputs `padded_inputs` would make for its rows (tensors once they reach the main
    process), where its positions go among the unit's (`targets`, in the unit's position order), and their tail
    uniforms (None when the cache draws no tail)."""

    input_ids: np.ndarray | torch.Tensor  # int64 [B, L], padded
    attention_mask: np.ndarray | torch.Tensor  # int64 [B, L]
    rows: np.ndarray | torch.Tensor  # int64 [N] the batch row of each masked position
    cols: np.ndarray | torch.Tensor  # int32 [N] its column
    targets: np.ndarray  # int64 [N] its index among the unit's positions
    tail_uniforms: np.ndarray | torch.Tensor | None  # float32 [N, tail samples]

    def tensors(self, pin: bool) -> Batch:
        """The same batch as tensors (sharing the arrays' memory), in page-locked memory when `pin`, so that the
        copy to the accelerator can run while the host goes on."""

        def tensor(array):
            if array is None:
                return None
            value = torch.as_tensor(array)
            return value.pin_memory() if pin else value

        return Batch(
            tensor(self.input_ids),
            tensor(self.attention_mask),
            tensor(self.rows),
            tensor(self.cols),
            self.targets,
            tensor(self.tail_uniforms),
        )


def plan_batches(
    rows: UnitRows,
    pad_id: int,
    batch_tokens: int | None,
    batch_size: int | None,
    tail: TailSampling | None = None,
) -> list[Batch]:
    """The unit's forward passes: `length_batches` of its rows, each padded as `padded_inputs` pads it."""
    input_lengths = np.diff(rows.input_offsets)
    position_counts = np.diff(rows.position_offsets)
    uniforms = tail.uniforms(rows) if tail else None
    batches = []
    for members in length_batches(input_lengths.tolist(), batch_tokens, batch_size):
        members = np.asarray(members, dtype=np.int64)
        lengths = input_lengths[members]
        input_ids = np.full((len(members), int(lengths.max())), pad_id, dtype=np.int64)
        attention_mask = np.zeros(input_ids.shape, dtype=np.int64)
        batch_row, source = _ranges(rows.input_offsets[members], lengths)
        column = source - np.repeat(rows.input_offsets[members], lengths)
        input_ids[batch_row, column] = rows.input_ids[source]
        attention_mask[batch_row, column] = 1
        position_row, targets = _ranges(rows.position_offsets[members], position_counts[members])
        batches.append(
            Batch(
                input_ids,
                attention_mask,
                position_row,
                rows.positions[targets],
                targets,
                None if uniforms is None else uniforms[targets],
            )
        )
    return batches


def score_unit(
    teacher,
    batches: list[Batch],
    positions: int,
    k: int,
    temperatures: list[float],
    tail: TailSampling | None = None,
) -> TeacherPredictions:
    """Run the teacher over a unit's batches (as tensors); return its predictions at the unit's `positions` masked
    positions, in row order (the order `build_table` expects), with `tail.samples` draws per position outside the
    top-k.

    Each batch's results come back in one copy that is waited for only once the next batch is under way, so an
    accelerator never waits for the host to store them."""
    samples = tail.samples if tail else 0
    found = TeacherPredictions(
        np.zeros((positions, k), dtype=np.int32),
        np.zeros((positions, k), dtype=np.float32),
        np.zeros((positions, len(temperatures)), dtype=np.float32),
        np.zeros(positions, dtype=np.float32),
        np.full((positions, samples), -1, dtype=np.int32),
        np.zeros((positions, samples), dtype=np.float32),
    )

    def store(targets: np.ndarray, copy) -> None:
        scored = teacher.unpack(copy.wait(), k, len(temperatures), samples)
        found.topk_logprobs[targets] = scored.values.numpy()
        found.topk_ids[targets] = scored.ids.numpy()
        found.log_partitions[targets] = scored.partitions.numpy()
        found.entropies[targets] = scored.entropies.numpy()
        if scored.tail is not None:
            found.tail_ids[targets] = scored.tail[0].numpy()
            found.tail_logprobs[targets] = scored.tail[1].numpy()

    in_flight = None
    for batch in batches:
        copy = teacher.predict(
            batch.input_ids,
            batch.attention_mask,
            batch.rows,
            batch.cols,
            k=k,
            temperatures=temperatures,
            tail_uniforms=batch.tail_uniforms,
            tail_temperature=tail.temperature if tail else None,
        )
        if in_flight is not None:
            store(*in_flight)
        in_flight = (batch.targets, copy)
    if in_flight is not None:
        store(*in_flight)
    return found


@dataclass(frozen=True)
class TailSampling:
    """How many ids stage one draws per masked position from the teacher's distribution outside the top-k, at
    which temperature, and from which uniforms: each row's come from a generator seeded by (seed, doc_id, window,
    copy), like its masking, so the draws do not depend on the batch, the rank or a resume."""

    samples: int
    temperature: float
    seed: int

    def uniforms(self, rows: UnitRows) -> np.ndarray:
        """[positions of the unit, samples] uniforms in [0, 1), in row order: row by row, what
        `np.random.default_rng([window_seed, _TAIL_STREAM]).random((positions, samples), dtype=np.float32)` gives."""
        found = np.zeros((int(rows.position_offsets[-1]), self.samples), dtype=np.float32)
        seeds = [
            window_seed(self.seed, d, w, c)
            for d, w, c in zip(rows.doc_ids, rows.windows.tolist(), rows.copies.tolist(), strict=True)
        ]
        generators = SeededGenerator()
        offsets = rows.position_offsets.tolist()
        for start, first, end in zip(
            pcg64_starts([[seed, _TAIL_STREAM] for seed in seeds]), offsets, offsets[1:], strict=False
        ):
            if end > first:
                generators.at(start).random(dtype=np.float32, out=found[first:end])
        return found


_TAIL_STREAM = 7  # keeps the tail's generator apart from the masking's, which is seeded by the same window
