"""Parquet shards of cached teacher predictions: the schema, atomic writing, and reading back.

One row per (window, copy) of a document; see docs/cache-format.md for the meaning of each column.
A shard is written under a temporary name in its final folder and renamed into place, so a reader (or a
resumed run) never sees a half-written file under a real name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = ("doc_id", "window", "copy", "language", "input_ids", "positions", "labels", "topk_ids", "topk_logprobs")


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
        ]
    )


@dataclass(frozen=True)
class ShardStats:
    """What the manifest records about one shard."""

    path: str  # relative to the cache folder
    rows: int
    masked_positions: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(cache_dir: Path, relative_path: str, table: pa.Table) -> ShardStats:
    """Write `table` to cache_dir/relative_path via a temporary file and a rename; return its stats."""
    final = cache_dir / relative_path
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    # Statistics and dictionary pages buy nothing for list columns that are read whole, and cost bytes.
    pq.write_table(table, temporary, compression="zstd", write_statistics=False, use_dictionary=["doc_id", "language"])
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    masked = int(pc.sum(pc.list_value_length(table.column("positions"))).as_py() or 0)
    return ShardStats(relative_path, table.num_rows, masked, final.stat().st_size, sha256_file(final))


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def check_shard_file(cache_dir: Path, shard: dict) -> str | None:
    """A one-line problem when the shard file is missing or differs from its manifest entry (size, sha256)."""
    path = cache_dir / shard["path"]
    if not path.is_file():
        return f"{shard['path']}: missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{shard['path']}: {path.stat().st_size} bytes, the manifest says {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        return f"{shard['path']}: sha256 differs from the manifest (the file is corrupted)"
    return None
