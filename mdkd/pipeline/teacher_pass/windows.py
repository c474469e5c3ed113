"""From documents to masked, length-bucketed teacher batches, and from teacher outputs back to shard rows.

A unit of work is a block of consecutive documents of one language for one teacher. Its rows are written in
(document, window, copy) order whatever order the batches ran in, and its batches depend only on the unit and
the batch settings; so with the same settings a recomputed unit after a crash is the same bytes as the lost
one. (Other batch settings change the log-probabilities in the last bits, as padding changes the arithmetic.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mdkd.pipeline.cache.shards import CachedRow, TeacherPredictions
from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker, window_seed


@dataclass
class PreparedUnit:
    rows: list[CachedRow]  # in (document, window, copy) order
    windows_without_tokens: int
    tokens: int


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
    rows: list[CachedRow] = []
    windows_seen = [0] * len(documents)
    skipped = tokens = 0
    for ids, special, sample in zip(
        encoded["input_ids"], encoded["special_tokens_mask"], encoded["overflow_to_sample_mapping"], strict=False
    ):
        window = windows_seen[sample]
        windows_seen[sample] += 1
        if not any(flag == 0 for flag in special):
            skipped += 1  # e.g. a line of control characters the normaliser removes entirely
            continue
        doc_id = documents[sample].doc_id
        for copy in range(copies):
            masked = masker(ids, special, doc_id, window, copy)
            rows.append(CachedRow(doc_id, window, copy, masked.input_ids, masked.positions, masked.labels))
            tokens += len(ids)
    return PreparedUnit(rows, skipped, tokens)


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


def score_unit(
    teacher,
    unit: PreparedUnit,
    k: int,
    temperatures: list[float],
    batch_tokens: int | None,
    batch_size: int | None,
    tail: TailSampling | None = None,
) -> TeacherPredictions:
    """Run the teacher over a unit in length-bucketed batches; return its predictions at every masked position,
    in row order (the order `build_table` expects), with `tail.samples` draws per position outside the top-k."""
    rows = unit.rows
    positions_before = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r.positions) for r in rows], out=positions_before[1:])
    total = positions_before[-1]
    samples = tail.samples if tail else 0
    found = TeacherPredictions(
        np.zeros((total, k), dtype=np.int32),
        np.zeros((total, k), dtype=np.float32),
        np.zeros((total, len(temperatures)), dtype=np.float32),
        np.zeros(total, dtype=np.float32),
        np.full((total, samples), -1, dtype=np.int32),
        np.zeros((total, samples), dtype=np.float32),
    )
    uniforms = tail.uniforms(rows) if tail else None
    for batch in length_batches([len(r.input_ids) for r in rows], batch_tokens, batch_size):
        taken_rows = [slice(positions_before[i], positions_before[i + 1]) for i in batch]
        scored = teacher.top_k(
            *padded_inputs([rows[i] for i in batch], teacher.pad_id),
            k=k,
            temperatures=temperatures,
            tail_uniforms=None
            if uniforms is None
            else torch.from_numpy(np.concatenate([uniforms[t] for t in taken_rows])),
            tail_temperature=tail.temperature if tail else None,
        )
        offset = 0
        for taken in taken_rows:
            here = slice(offset, offset + taken.stop - taken.start)
            found.topk_logprobs[taken] = scored.values[here].numpy()
            found.topk_ids[taken] = scored.ids[here].numpy()
            found.log_partitions[taken] = scored.partitions[here].numpy()
            found.entropies[taken] = scored.entropies[here].numpy()
            if scored.tail is not None:
                found.tail_ids[taken] = scored.tail[0][here].numpy()
                found.tail_logprobs[taken] = scored.tail[1][here].numpy()
            offset += taken.stop - taken.start
    return found


@dataclass(frozen=True)
class TailSampling:
    """How many ids stage one draws per masked position from the teacher's distribution outside the top-k, at
    which temperature, and from which uniforms: each row's come from a generator seeded by (seed, doc_id, window,
    copy), like its masking, so the draws do not depend on the batch, the rank or a resume."""

    samples: int
    temperature: float
    seed: int

    def uniforms(self, rows: list[CachedRow]) -> np.ndarray:
        """[positions of the unit, samples] uniforms in [0, 1), in row order."""
        parts = [
            np.random.default_rng([window_seed(self.seed, r.doc_id, r.window, r.copy), _TAIL_STREAM]).random(
                (len(r.positions), self.samples), dtype=np.float32
            )
            for r in rows
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.samples), dtype=np.float32)


_TAIL_STREAM = 7  # keeps the tail's generator apart from the masking's, which is seeded by the same window
