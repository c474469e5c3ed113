"""Reading a cache: what stage two, evaluation, `cache inspect` and `cache verify` know of stage one.

A `CacheReader` is the manifest plus access to the shards and tokenizer copies it lists. It hands out decoded
arrays (`ShardRows`), doc_ids and file checks; nothing outside this package opens a shard or parses the manifest,
and `is_cache` says whether a folder holds a cache at all. A cache on an object store (a URI) is read through local
copies of its objects (`ObjectFolder.fetch`), each checked against the manifest's sha256 as it arrives and kept
for later reads; docs/cache-format.md, "On object stores".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from mdkd.pipeline.cache.manifest import MANIFEST_NAME, Manifest, ShardEntry, TeacherEntry
from mdkd.pipeline.cache.shards import CachedPredictions, ShardRows, read_doc_ids, read_table
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import sha256_of_file, sha256_of_folder
from mdkd.pipeline.store import Folder, open_folder


def is_cache(folder: str | Path | Folder) -> bool:
    """Whether `folder` (a local path or a URI) holds a cache (complete or not): a manifest file, readable or not."""
    return open_folder(folder).exists(MANIFEST_NAME)


class CacheReader:
    """A cache folder (a local path or a URI), opened through its manifest (by default it must be complete).

    `dir` is how the cache is named: the local path, or the URI."""

    def __init__(self, cache_dir: str | Path | Folder, require_complete: bool = True):
        self.folder = open_folder(cache_dir)
        self.dir = self.folder.path if self.folder.is_local else self.folder.uri
        self.manifest = Manifest.load(self.folder, require_complete)

    def teacher(self, name: str) -> TeacherEntry:
        return self.manifest.teachers[name]

    def tokenizer_file(self, name: str) -> Path:
        """The teacher's `tokenizer.json` as stage one saved it (a local copy for a cache on an object store)."""
        return self._tokenizer_folder(name) / "tokenizer.json"

    def _tokenizer_folder(self, name: str) -> Path:
        entry = self.teacher(name)
        if self.folder.is_local:
            return self.folder.path / entry.tokenizer_dir
        copy = self.folder.fetch_folder(entry.tokenizer_dir, entry.tokenizer_hash)
        return self._checked_copy(copy, lambda: self.check_tokenizer_copy(name))

    def check_tokenizer_copy(self, name: str) -> str | None:
        """A one-line problem when the teacher's tokenizer copy is missing, lies outside the cache, or differs from
        the hash stage one recorded (a swapped id would silently remap every prediction)."""
        entry = self.teacher(name)
        if not self.folder.is_local:
            if not self.folder.exists(entry.tokenizer_dir):
                return f"{entry.tokenizer_dir}: tokenizer copy of teacher {name} is missing"
            if self.folder.fetch_folder(entry.tokenizer_dir, entry.tokenizer_hash) is None:
                return f"{entry.tokenizer_dir}: tokenizer copy of teacher {name} differs from the manifest's hash"
            return None
        folder = self.folder.path / entry.tokenizer_dir
        if not self._inside(folder):
            return f"{entry.tokenizer_dir}: tokenizer copy of teacher {name} lies outside the cache"
        if not folder.is_dir():
            return f"{entry.tokenizer_dir}: tokenizer copy of teacher {name} is missing"
        if sha256_of_folder(folder) != entry.tokenizer_hash:
            return f"{entry.tokenizer_dir}: tokenizer copy of teacher {name} differs from the manifest's hash"
        return None

    def problems(self, shards: list[ShardEntry], teachers: list[str], progress=iter) -> list[str]:
        """What is wrong with the files a command is about to read: the tokenizer copies of `teachers` and the
        `shards` (size and sha256), every path inside the cache folder. The one check of every reader (`verify`
        goes on to the rows); `progress` wraps the shard list (a progress bar, say)."""
        found = [problem for name in teachers if (problem := self.check_tokenizer_copy(name))]
        return found + [problem for shard in progress(shards) if (problem := self.check_file(shard))]

    def require_intact(self, shards: list[ShardEntry], teachers: list[str], progress=iter) -> None:
        """`problems`, as a UserError naming the first one and the command that repairs the cache."""
        found = self.problems(shards, teachers, progress)
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UserError(
                f"cache {self.dir} is damaged: {found[0]}{more} (`mdkd cache verify {self.dir}` lists every "
                f"problem; rerun `mdkd cache-logits` with its config and --out {self.dir} to repair it)"
            )

    def _inside(self, path: Path) -> bool:
        """Whether `path` resolves inside the cache folder (a symbolic link may point anywhere)."""
        return path.resolve().is_relative_to(self.folder.path.resolve())

    def _file(self, shard: ShardEntry) -> Path:
        """The shard's local file: in the folder, or the checked local copy of its object."""
        if self.folder.is_local:
            return self.folder.path / shard.path
        return self._checked_copy(self.folder.fetch(shard.path, shard.sha256), lambda: self.check_file(shard))

    def _checked_copy(self, copy: Path | None, problem: Callable[[], str | None]) -> Path:
        """A local copy fetched from the store, or (None: the object is missing or its bytes differ) the error that
        names what is wrong with it, asked of `problem`, and how to repair the cache."""
        if copy is None:
            raise UserError(
                f"cache {self.dir} is damaged: {problem()} (`mdkd cache verify {self.dir}` lists every problem; "
                f"rerun `mdkd cache-logits` with its config and --out {self.dir} to repair it)"
            )
        return copy

    def rows(self, shard: ShardEntry, top_k: int | None = None, tail: bool = False) -> ShardRows:
        """A shard decoded; `top_k` keeps the k' most probable cached predictions per position; `tail` decodes the
        sampled tail too (a cache drawing one)."""
        return ShardRows(self._file(shard), self.manifest.top_k, top_k, self.manifest.tail_samples if tail else 0)

    def doc_ids(self, shard: ShardEntry) -> list[str]:
        return read_doc_ids(self._file(shard))

    def table(self, shard: ShardEntry) -> pa.Table:
        """The raw Arrow table (for verification)."""
        return read_table(self._file(shard))

    def matching_rows(self, shard: ShardEntry, wanted: Callable[[str], bool]) -> np.ndarray:
        """Indices of the shard's rows whose doc_id `wanted` accepts (e.g. the held-out rule, or its negation)."""
        return np.array([i for i, doc_id in enumerate(self.doc_ids(shard)) if wanted(doc_id)], dtype=np.int64)

    def select_rows(
        self,
        teacher: str,
        language: str,
        wanted: Callable[[str], bool],
        limit: int | None = None,
        top_k: int | None = None,
    ) -> Iterator[CachedPredictions]:
        """Up to `limit` rows (see `ShardRows.row`) of a (teacher, language) whose doc_id `wanted` accepts, in cache
        order (deterministic)."""
        taken = 0
        for shard in self.manifest.shards_of(teacher, language):
            indices = self.matching_rows(shard, wanted)
            if not len(indices):
                continue
            rows = self.rows(shard, top_k)
            for index in indices:
                if limit is not None and taken >= limit:
                    return
                yield rows.row(int(index))
                taken += 1

    def check_file(self, shard: ShardEntry, reread: bool = False) -> str | None:
        """A one-line problem when the shard file is missing or differs from its manifest entry (size, sha256).

        On an object store the object's bytes are hashed as they are copied here; a copy kept from an earlier read
        is trusted unless `reread` (`cache verify`), but the object must still exist with its size."""
        if not self.folder.is_local:
            size = self.folder.size(shard.path)
            if size is None:
                return f"{shard.path}: missing"
            if size != shard.bytes:
                return f"{shard.path}: {size} bytes, the manifest says {shard.bytes}"
            if self.folder.fetch(shard.path, shard.sha256, reread) is None:
                return f"{shard.path}: sha256 differs from the manifest (the file is corrupted)"
            return None
        path = self.folder.path / shard.path
        if not self._inside(path):
            return f"{shard.path}: lies outside the cache"
        if not path.is_file():
            return f"{shard.path}: missing"
        if path.stat().st_size != shard.bytes:
            return f"{shard.path}: {path.stat().st_size} bytes, the manifest says {shard.bytes}"
        if sha256_of_file(path) != shard.sha256:
            return f"{shard.path}: sha256 differs from the manifest (the file is corrupted)"
        return None

    def unlisted_shards(self) -> list[str]:
        """Parquet files in the folder that the manifest does not list (relative paths, sorted)."""
        listed = {shard.path for shard in self.manifest.shards}
        return [relative for relative in self.folder.find(".parquet") if relative not in listed]
