"""Writing a cache: every file stage one puts in a cache folder, in the order that makes it resumable.

`start` writes the manifest with `complete: false` and the run's identity, the resolved config and the teachers'
tokenizer copies (a resumed cache keeps them). `write_unit` writes one unit (teacher, language, part): its shard,
then its marker under `.progress/`, then a line of this rank's log (on an object store, which cannot append, the
log is uploaded whole every `LOG_UPLOAD_UNITS` units and by `flush_log`); a unit is done once its marker parses and its
shard exists with the marker's size, so a rerun redoes exactly the units a crash cut short. `finish` merges the
markers into the manifest, which is written last with `complete: true`. The folder is local or on an object store
(`pipeline/store.py`): each write is whole before the next begins on both, so the order is the protocol.
docs/cache-format.md, "Units, completion and resuming".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from pydantic import ValidationError

from mdkd import __version__
from mdkd.pipeline.cache.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, ShardEntry, Totals
from mdkd.pipeline.cache.reader import CacheReader, is_cache
from mdkd.pipeline.cache.shards import write_shard
from mdkd.pipeline.store import Folder, open_folder

PROGRESS_DIR = ".progress"
# On an object store a rank's log is uploaded whole (objects cannot be appended to) once this many lines wait,
# not after every unit, so that its traffic stays a small part of the shards'.
LOG_UPLOAD_UNITS = 64


class Tokenizer(Protocol):
    """All the writer needs of a teacher's tokenizer: Hugging Face's `save_pretrained`."""

    def save_pretrained(self, save_directory: Path) -> Any: ...


@dataclass(frozen=True)
class TokenizerCopy:
    """A teacher's tokenizer as the cache holds it: its folder, relative to the cache, and that folder's hash."""

    folder: str
    sha256: str


@dataclass(frozen=True)
class Damage:
    """The parts of a complete cache that differ from its manifest; empty when it is intact."""

    shards: list[ShardEntry]
    tokenizers: list[str]  # teachers whose tokenizer copy differs from its recorded hash

    def __bool__(self) -> bool:
        return bool(self.shards or self.tokenizers)


class CacheWriter:
    """The cache folder `folder` (a local path or a URI), as rank `rank` of stage one writes it."""

    def __init__(self, folder: str | Path | Folder, rank: int = 0):
        self.folder = open_folder(folder)
        self.log_name = f"logs/cache-logits.rank{rank}.jsonl"
        self._log_lines: list[str] | None = None  # an object store's log: what it held, then this run's lines
        self._log_waiting = 0  # lines of _log_lines not uploaded yet

    def start(
        self,
        config_yaml: str,
        tokenizers: Mapping[str, Tokenizer],
        describe: Callable[[dict[str, TokenizerCopy]], dict],
    ) -> None:
        """Rank 0, before any unit: clear the temporary files of an interrupted run and, for a new cache, write the
        tokenizer copies, config.yaml and the incomplete manifest. `describe` gives the manifest's fields from the
        copies (all but the schema, the version and what `finish` fills in)."""
        self.folder.remove_leftovers()
        if is_cache(self.folder):
            return  # resumed: its manifest is the record the markers' work belongs to
        copies = {}
        for name, tokenizer in tokenizers.items():
            copies[name] = TokenizerCopy(
                f"tokenizers/{name}", self.folder.write_folder(f"tokenizers/{name}", tokenizer.save_pretrained)
            )
        fields = describe(copies)
        self.folder.write_text("config.yaml", config_yaml)
        self._save(Manifest(schema_version=SCHEMA_VERSION, mdkd_version=__version__, complete=False, **fields))

    def damage(self) -> Damage:
        """What of a complete cache no longer matches its manifest: shards (size, sha256) and tokenizer copies."""
        reader = CacheReader(self.folder)
        return Damage(
            shards=[shard for shard in reader.manifest.shards if reader.check_file(shard)],
            tokenizers=[name for name in reader.manifest.teachers if reader.check_tokenizer_copy(name)],
        )

    def reopen(self, damage: Damage, tokenizers: Mapping[str, Tokenizer]) -> None:
        """Rank 0: make a damaged complete cache an unfinished one that a run finishes like any other. Every intact
        unit gets its marker back, the damaged shards go, damaged tokenizer copies are written again, and only then
        does the manifest say complete: false (a crash in between leaves a complete manifest and the same damage)."""
        manifest = CacheReader(self.folder).manifest
        for name in damage.tokenizers:
            self.folder.remove_tree(manifest.teachers[name].tokenizer_dir)
            self.folder.write_folder(manifest.teachers[name].tokenizer_dir, tokenizers[name].save_pretrained)
        damaged = {shard.path for shard in damage.shards}
        for shard in manifest.shards:
            if shard.path in damaged:
                self.folder.remove(shard.path)
            else:
                self.folder.write_json(
                    self._marker(shard.teacher, shard.language, shard.part), shard.model_dump(mode="json")
                )
        manifest.shards, manifest.totals, manifest.complete = [], None, False
        self._save(manifest)

    def is_done(self, teacher: str, language: str, part: int) -> bool:
        return self._finished(teacher, language, part) is not None

    def write_unit(
        self,
        teacher: str,
        language: str,
        part: int,
        table: pa.Table,
        *,
        documents: int,
        windows_without_tokens: int,
        seconds: float,
        tokens: int,
    ) -> None:
        """The shard first, then its marker (the unit's completion record), then the log line."""
        path = _shard_path(teacher, language, part)
        written = write_shard(self.folder, path, table)
        entry = ShardEntry(
            teacher=teacher,
            language=language,
            part=part,
            documents=documents,
            windows_without_tokens=windows_without_tokens,
            path=path,
            rows=written.rows,
            masked_positions=written.masked_positions,
            bytes=written.bytes,
            sha256=written.sha256,
        )
        self.folder.write_json(self._marker(teacher, language, part), entry.model_dump(mode="json"))
        event = {
            **entry.model_dump(),
            "seconds": round(seconds, 4),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        }
        self._log(json.dumps(event))

    def _log(self, line: str) -> None:
        if self.folder.is_local:
            self.folder.append_line(self.log_name, line)
            return
        if self._log_lines is None:
            try:
                self._log_lines = self.folder.read_text(self.log_name).splitlines()
            except FileNotFoundError:
                self._log_lines = []
        self._log_lines.append(line)
        self._log_waiting += 1
        if self._log_waiting >= LOG_UPLOAD_UNITS:
            self.flush_log()

    def flush_log(self) -> None:
        """Every rank, after its last unit: upload the log lines still waiting (only an object store's wait)."""
        if self._log_waiting:
            self.folder.write_text(self.log_name, "\n".join(self._log_lines) + "\n")
            self._log_waiting = 0

    def finish(self, parts: Mapping[str, int]) -> Manifest:
        """Rank 0, once every rank is done: the manifest with every unit's record, saying complete.

        `parts` is each language's number of parts; a unit without a marker then is a bug, not a user error."""
        manifest = CacheReader(self.folder, require_complete=False).manifest
        shards, missing = [], []
        for name, teacher in manifest.teachers.items():
            for language in teacher.languages:
                for part in range(parts[language]):
                    entry = self._finished(name, language, part)
                    if entry is None:
                        missing.append(_shard_path(name, language, part))
                    else:
                        shards.append(entry)
        if missing:
            raise RuntimeError(f"{len(missing)} units have no shard after every rank finished, e.g. {missing[0]}")
        manifest.shards = shards
        manifest.totals = Totals(
            rows=sum(s.rows for s in shards),
            masked_positions=sum(s.masked_positions for s in shards),
            bytes=sum(s.bytes for s in shards),
        )
        manifest.complete = True
        self._save(manifest)
        self.folder.remove_tree(PROGRESS_DIR)
        return manifest

    def _save(self, manifest: Manifest) -> None:
        self.folder.write_json(MANIFEST_NAME, manifest.model_dump(mode="json"))

    def _marker(self, teacher: str, language: str, part: int) -> str:
        return f"{PROGRESS_DIR}/{teacher}/{language}/part-{part:05d}.json"

    def _finished(self, teacher: str, language: str, part: int) -> ShardEntry | None:
        """The unit's record, or None when it still has to run (no marker, a torn one, no shard of its size)."""
        try:
            entry = ShardEntry.model_validate_json(self.folder.read_text(self._marker(teacher, language, part)))
        except (OSError, UnicodeDecodeError, ValidationError):
            return None
        return entry if self.folder.size(entry.path) == entry.bytes else None


def _shard_path(teacher: str, language: str, part: int) -> str:
    """Where a unit's shard lives, relative to the cache folder."""
    return f"{teacher}/{language}/part-{part:05d}.parquet"
