"""Parquet shards of cached teacher predictions: the one place that knows their columns.

One row per (window, copy) of a document; docs/cache-format.md gives the meaning of each column. Stage one
turns a unit's rows (`UnitRows`) and its teacher's predictions into a table with `build_table`, and the cache
writer writes it with `write_shard` (locally a temporary name in the final folder, fsync, rename; on an object store
one whole upload: a reader or a resumed run never sees a half-written file under a real name). Everything else
reads them back as flat numpy arrays through `ShardRows`, or as `read_doc_ids` (the doc_id column alone) and
`read_table` (the raw Arrow table, for verification).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdkd.pipeline.store import Folder, open_folder

COLUMNS = (
    "doc_id",
    "window",
    "copy",
    "language",
    "input_ids",
    "positions",
    "labels",
    "topk_ids",
    "topk_logprobs",
    "log_partitions",
    "entropies",
    "tail_ids",
    "tail_counts",
    "tail_logprobs",
)
COLUMNS_SCHEMA_2 = COLUMNS[:-3]  # before the sampled tail
COLUMNS_SCHEMA_1 = COLUMNS[:-5]  # before the tempered log-partitions and entropies
COLUMNS_BY_SCHEMA = {1: COLUMNS_SCHEMA_1, 2: COLUMNS_SCHEMA_2, 3: COLUMNS}


def shard_schema(logprobs_dtype: str) -> pa.Schema:
    logprob_type = pa.float16() if logprobs_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("window", pa.int32()),
            ("copy", pa.int32()),
            ("language", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("positions", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logprobs", pa.list_(pa.list_(logprob_type))),
            # Always float32: stage two subtracts it from log p / tau, and fp16 would lose the small tail masses.
            ("log_partitions", pa.list_(pa.list_(pa.float32()))),
            ("entropies", pa.list_(pa.float32())),
            # The sampled tail: per position the distinct ids drawn outside the top-k, ascending, how often each
            # was drawn, and its log-probability at tau = 1 (empty lists when the cache draws none).
            ("tail_ids", pa.list_(pa.list_(pa.int32()))),
            ("tail_counts", pa.list_(pa.list_(pa.int16()))),
            ("tail_logprobs", pa.list_(pa.list_(logprob_type))),
        ]
    )


@dataclass(frozen=True)
class CachedRow:
    """What stage one knows about one (window, copy), in the teacher's ids."""

    doc_id: str
    window: int
    copy: int
    input_ids: np.ndarray  # [T] the masked input the teacher saw
    positions: np.ndarray  # [n] masked positions
    labels: np.ndarray  # [n] original tokens there


@dataclass(frozen=True)
class UnitRows(Sequence):
    """A unit's rows as flat arrays, what `build_table` turns into a shard: row i's input is
    `input_ids[input_offsets[i]:input_offsets[i + 1]]`, its masked positions and their labels are the same slice
    of `positions` and `labels` by `position_offsets`. Flat, a unit crosses a process boundary as a few arrays
    rather than three per row; indexing it still gives `CachedRow`s."""

    doc_ids: list[str]
    windows: np.ndarray  # int32 [R]
    copies: np.ndarray  # int32 [R]
    input_ids: np.ndarray  # int32, every row's masked input, concatenated
    input_offsets: np.ndarray  # int64 [R + 1]
    positions: np.ndarray  # int32, every row's masked positions (ascending within a row), concatenated
    position_offsets: np.ndarray  # int64 [R + 1]
    labels: np.ndarray  # int32, the original ids at those positions

    @classmethod
    def from_rows(cls, rows: Iterable[CachedRow]) -> UnitRows:
        rows = list(rows)

        def flat(field: str) -> tuple[np.ndarray, np.ndarray]:
            parts = [np.asarray(getattr(r, field), dtype=np.int32) for r in rows]
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
            return values, offsets_of([len(p) for p in parts])

        (input_ids, input_offsets), (positions, position_offsets) = flat("input_ids"), flat("positions")
        return cls(
            [r.doc_id for r in rows],
            np.array([r.window for r in rows], dtype=np.int32),
            np.array([r.copy for r in rows], dtype=np.int32),
            input_ids,
            input_offsets,
            positions,
            position_offsets,
            flat("labels")[0],
        )

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # a negative index counts from the end; past the end is an IndexError
        a, b = self.input_offsets[index], self.input_offsets[index + 1]
        c, d = self.position_offsets[index], self.position_offsets[index + 1]
        return CachedRow(
            self.doc_ids[index],
            int(self.windows[index]),
            int(self.copies[index]),
            self.input_ids[a:b],
            self.positions[c:d],
            self.labels[c:d],
        )


@dataclass(frozen=True)
class TeacherPredictions:
    """A teacher's predictions at a unit's masked positions, one array row per position, in row order."""

    topk_ids: np.ndarray  # [P, k] teacher ids, most probable first
    topk_logprobs: np.ndarray  # [P, k] log-probabilities at temperature 1
    log_partitions: np.ndarray  # [P, temperatures] logsumexp_j(log p_j / tau) over the whole vocabulary
    entropies: np.ndarray  # [P] entropy of the whole distribution at temperature 1, in nats
    tail_ids: np.ndarray  # [P, M] ids drawn outside the top-k (-1: none drawn at that position)
    tail_logprobs: np.ndarray  # [P, M] their log-probabilities at temperature 1


def offsets_of(lengths, dtype=np.int64) -> np.ndarray:
    """Offsets [len(lengths) + 1] of pieces laid end to end: piece i is [offsets[i], offsets[i + 1])."""
    offsets = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _list_array(values: np.ndarray, lengths) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets_of(lengths, np.int32)), pa.array(values))


def build_table(rows: UnitRows, language: str, predictions: TeacherPredictions, logprobs_dtype: str) -> pa.Table:
    """Shard rows; row i's predictions are the next len(positions of row i) rows of each array of `predictions`."""
    topk_ids, topk_logprobs, log_partitions = (
        predictions.topk_ids,
        predictions.topk_logprobs,
        predictions.log_partitions,
    )
    counts = np.diff(rows.position_offsets)
    k = topk_ids.shape[1] if topk_ids.ndim == 2 else 0
    per_position = np.full(int(counts.sum()), k, dtype=np.int64)
    per_temperature = np.full(int(counts.sum()), log_partitions.shape[1] if log_partitions.ndim == 2 else 0)
    value_type = np.float16 if logprobs_dtype == "float16" else np.float32
    columns = {
        "doc_id": pa.array(rows.doc_ids, pa.string()),
        "window": pa.array(rows.windows, pa.int32()),
        "copy": pa.array(rows.copies, pa.int32()),
        "language": pa.array([language] * len(rows), pa.string()),
        "input_ids": _list_array(rows.input_ids.astype(np.int32), np.diff(rows.input_offsets)),
        "positions": _list_array(rows.positions.astype(np.int32), counts),
        "labels": _list_array(rows.labels.astype(np.int32), counts),
        "topk_ids": _list_array(_list_array(topk_ids.reshape(-1).astype(np.int32), per_position), counts),
        "topk_logprobs": _list_array(_list_array(topk_logprobs.reshape(-1).astype(value_type), per_position), counts),
        "log_partitions": _list_array(
            _list_array(log_partitions.reshape(-1).astype(np.float32), per_temperature), counts
        ),
        "entropies": _list_array(predictions.entropies.astype(np.float32), counts),
    }
    ids, draws, logprobs, per_tail = _distinct_draws(predictions.tail_ids, predictions.tail_logprobs)
    columns["tail_ids"] = _list_array(_list_array(ids.astype(np.int32), per_tail), counts)
    columns["tail_counts"] = _list_array(_list_array(draws.astype(np.int16), per_tail), counts)
    columns["tail_logprobs"] = _list_array(_list_array(logprobs.astype(value_type), per_tail), counts)
    return pa.Table.from_pydict(columns, schema=shard_schema(logprobs_dtype))


def _distinct_draws(ids: np.ndarray, logprobs: np.ndarray):
    """[P, M] draws (-1: none) -> the distinct ids of each position ascending, how often each was drawn, its
    log-probability, and how many distinct ids each position has (flat arrays, position after position)."""
    order = np.argsort(ids, axis=1, kind="stable")
    ids, logprobs = np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)
    first = ids >= 0
    first[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(first.ravel())
    width = ids.shape[1]
    # A run of one id ends where the next distinct id starts, or at the end of its position's row.
    ends = np.minimum(np.append(starts[1:], ids.size), (starts // max(width, 1) + 1) * width)
    return ids.ravel()[starts], ends - starts, logprobs.ravel()[starts], first.sum(axis=1)


@dataclass(frozen=True)
class CachedPredictions:
    """One cached row as read back, in the teacher's ids."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [n]
    labels: np.ndarray  # [n]
    topk_ids: np.ndarray  # [n, k']
    topk_logprobs: np.ndarray  # [n, k'] log-probabilities at temperature 1
    log_partitions: np.ndarray | None  # [n, temperatures] tempered log-partitions (None in a schema-1 cache)
    tail_ids: np.ndarray | None = None  # [n, M] distinct ids drawn outside the top-k (-1: padding); None: no tail
    tail_counts: np.ndarray | None = None  # [n, M] how often each was drawn (0: padding)
    tail_logprobs: np.ndarray | None = None  # [n, M] their log-probabilities at temperature 1


@dataclass(frozen=True)
class WrittenShard:
    """What the manifest records about a shard file."""

    rows: int
    masked_positions: int
    bytes: int
    sha256: str


def write_shard(cache: Path | Folder, relative_path: str, table: pa.Table) -> WrittenShard:
    """Write `table` to relative_path in the cache folder, whole before it has that name (`Folder.write_file`)."""

    def write(path: Path) -> None:
        # Statistics and dictionary pages buy nothing for list columns that are read whole, and cost bytes.
        pq.write_table(table, path, compression="zstd", write_statistics=False, use_dictionary=["doc_id", "language"])

    size, sha256 = open_folder(cache).write_file(relative_path, write)
    masked = int(pc.sum(pc.list_value_length(table.column("positions"))).as_py() or 0)
    return WrittenShard(table.num_rows, masked, size, sha256)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The shard as an Arrow table (verification, which checks the raw lists themselves)."""
    return pq.read_table(path, columns=columns)


def read_doc_ids(path: Path) -> list[str]:
    """Only the doc_id column: what the held-out split needs."""
    return pq.read_table(path, columns=["doc_id"]).column("doc_id").to_pylist()


def _flat(column) -> np.ndarray:
    return pc.list_flatten(column).to_numpy()


def _offsets(column) -> np.ndarray:
    return offsets_of(pc.list_value_length(column).to_numpy())


def _padded(column, width: int, fill) -> np.ndarray:
    """A list<list<x>> column (per row, per position, a variable list) as [positions, width], padded with `fill`."""
    per_position = pc.list_flatten(column)
    lengths = pc.list_value_length(per_position).to_numpy()
    values = _flat(per_position)
    padded = np.full((len(lengths), width), fill, dtype=values.dtype)
    starts = np.repeat(offsets_of(lengths)[:-1], lengths)
    padded[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(values)) - starts] = values
    return padded


class ShardRows:
    """A shard's rows decoded into flat numpy arrays plus offsets: slicing a row costs no Python object per token.

    `top_k` keeps the first k' of the cached k predictions per position (they are sorted, most probable first).
    Arrays are in the teacher's ids; log-probabilities are float32 whatever the stored type. A schema-1 shard has
    no log-partitions and no entropies (None).
    """

    def __init__(self, path: Path, cached_k: int, top_k: int | None = None, tail_samples: int = 0):
        # Only the columns decoded here: doc_ids and languages are strings, costly to read on the training path.
        columns = ["input_ids", "positions", "labels", "topk_ids", "topk_logprobs"]
        if "log_partitions" in pq.read_schema(path).names:  # a schema-1 shard has neither
            columns += ["log_partitions", "entropies"]
        if tail_samples:
            columns += ["tail_ids", "tail_counts", "tail_logprobs"]
        table = pq.read_table(path, columns=columns)
        k = top_k or cached_k
        self.input_ids, self.input_offsets = _flat(table.column("input_ids")), _offsets(table.column("input_ids"))
        self.positions, self.position_offsets = _flat(table.column("positions")), _offsets(table.column("positions"))
        self.labels = _flat(table.column("labels"))
        self.topk_ids = _flat(pc.list_flatten(table.column("topk_ids"))).reshape(-1, cached_k)[:, :k]
        logprobs = _flat(pc.list_flatten(table.column("topk_logprobs"))).reshape(-1, cached_k)[:, :k]
        self.topk_logprobs = logprobs.astype(np.float32)
        self.log_partitions = self.entropies = None
        if "log_partitions" in columns:
            self.log_partitions = _flat(pc.list_flatten(table.column("log_partitions"))).reshape(len(self.labels), -1)
            self.entropies = _flat(table.column("entropies"))
        self.tail_ids = self.tail_counts = self.tail_logprobs = None
        if tail_samples:
            self.tail_ids = _padded(table.column("tail_ids"), tail_samples, -1).astype(np.int64)
            self.tail_counts = _padded(table.column("tail_counts"), tail_samples, 0).astype(np.int64)
            self.tail_logprobs = _padded(table.column("tail_logprobs"), tail_samples, 0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.input_offsets) - 1

    def row(self, index: int) -> CachedPredictions:
        """One row: its input, masked positions, labels and the teacher's predictions there."""
        a, b = self.input_offsets[index], self.input_offsets[index + 1]
        c, d = self.position_offsets[index], self.position_offsets[index + 1]
        partitions = None if self.log_partitions is None else self.log_partitions[c:d]
        tail = (
            (None,) * 3
            if self.tail_ids is None
            else (x[c:d] for x in (self.tail_ids, self.tail_counts, self.tail_logprobs))
        )
        return CachedPredictions(
            self.input_ids[a:b],
            self.positions[c:d],
            self.labels[c:d],
            self.topk_ids[c:d],
            self.topk_logprobs[c:d],
            partitions,
            *tail,
        )

    def original_inputs(self) -> np.ndarray:
        """Every row's input ids with the masked positions put back to their labels, concatenated: the text the
        teacher read before masking (what token frequencies are counted on)."""
        ids = self.input_ids.astype(np.int64)
        counts = np.diff(self.position_offsets)
        ids[self.positions + np.repeat(self.input_offsets[:-1], counts)] = self.labels
        return ids
