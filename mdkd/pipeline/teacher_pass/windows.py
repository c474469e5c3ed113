"""From documents to masked, length-bucketed teacher batches, and from teacher outputs back to shard rows.

A unit of work is a block of consecutive documents of one language for one teacher. Its rows are written in
(document, window, copy) order whatever order the batches ran in, and its batches depend only on the unit and
the batch settings; so with the same settings a recomputed unit after a crash is the same bytes as the lost
one. (Other batch settings change the log-probabilities in the last bits, as padding changes the arithmetic.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker, MaskedWindow
from mdkd.pipeline.cache.shards import shard_schema


@dataclass
class Example:
    doc_id: str
    window: int
    copy: int
    masked: MaskedWindow


@dataclass
class PreparedUnit:
    examples: list[Example]  # in (document, window, copy) order
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
    examples: list[Example] = []
    windows_seen = [0] * len(documents)
    skipped = tokens = 0
    for ids, special, sample in zip(
        encoded["input_ids"], encoded["special_tokens_mask"], encoded["overflow_to_sample_mapping"]
    ):
        window = windows_seen[sample]
        windows_seen[sample] += 1
        if not any(flag == 0 for flag in special):
            skipped += 1  # e.g. a line of control characters the normaliser removes entirely
            continue
        doc_id = documents[sample].doc_id
        for copy in range(copies):
            examples.append(Example(doc_id, window, copy, masker(ids, special, doc_id, window, copy)))
            tokens += len(ids)
    return PreparedUnit(examples, skipped, tokens)


def length_batches(lengths: list[int], batch_tokens: int | None, batch_size: int | None) -> list[list[int]]:
    """Group example indices of similar length: `batch_size` examples each, or (when it is not set) as many as
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


def collate(examples: list[Example], pad_id: int):
    """Padded input ids, attention mask, and the (row, column) of every masked position in the batch."""
    longest = max(len(e.masked.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    rows, cols = [], []
    for row, example in enumerate(examples):
        ids = torch.from_numpy(example.masked.input_ids.astype(np.int64))
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        rows.append(np.full(len(example.masked.positions), row))
        cols.append(example.masked.positions)
    return input_ids, attention_mask, torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))


def _list_array(values: np.ndarray, lengths: list[int] | np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build_table(
    examples: list[Example], topk_logprobs: np.ndarray, topk_ids: np.ndarray, language: str, logprobs_dtype: str
) -> pa.Table:
    """Shard rows for `examples`; row i's predictions are the next len(positions) rows of the top-k arrays."""
    counts = np.array([len(e.masked.positions) for e in examples], dtype=np.int64)
    k = topk_ids.shape[1] if topk_ids.ndim == 2 else 0
    per_position = np.full(int(counts.sum()), k, dtype=np.int64)
    value_type = np.float16 if logprobs_dtype == "float16" else np.float32

    def concat(field: str) -> np.ndarray:
        parts = [getattr(e.masked, field) for e in examples]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)

    columns = {
        "doc_id": pa.array([e.doc_id for e in examples], pa.string()),
        "window": pa.array([e.window for e in examples], pa.int32()),
        "copy": pa.array([e.copy for e in examples], pa.int32()),
        "language": pa.array([language] * len(examples), pa.string()),
        "input_ids": _list_array(concat("input_ids"), [len(e.masked.input_ids) for e in examples]),
        "positions": _list_array(concat("positions"), counts),
        "labels": _list_array(concat("labels"), counts),
        "topk_ids": _list_array(_list_array(topk_ids.reshape(-1).astype(np.int32), per_position), counts),
        "topk_logprobs": _list_array(_list_array(topk_logprobs.reshape(-1).astype(value_type), per_position), counts),
    }
    return pa.Table.from_pydict(columns, schema=shard_schema(logprobs_dtype))


def score_unit(teacher, unit: PreparedUnit, k: int, batch_tokens: int | None, batch_size: int | None):
    """Run the teacher over a unit in length-bucketed batches; return top-k (log-probs, ids) for every masked
    position, in example order (the order `build_table` expects)."""
    examples = unit.examples
    positions_before = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(e.masked.positions) for e in examples], out=positions_before[1:])
    logprobs = np.zeros((positions_before[-1], k), dtype=np.float32)
    ids = np.zeros((positions_before[-1], k), dtype=np.int32)
    for batch in length_batches([len(e.masked.input_ids) for e in examples], batch_tokens, batch_size):
        values, top_ids = teacher.top_k(*collate([examples[i] for i in batch], teacher.pad_id), k=k)
        offset = 0
        for i in batch:
            start, end = positions_before[i], positions_before[i + 1]
            logprobs[start:end] = values[offset : offset + end - start].numpy()
            ids[start:end] = top_ids[offset : offset + end - start].numpy()
            offset += end - start
    return logprobs, ids
