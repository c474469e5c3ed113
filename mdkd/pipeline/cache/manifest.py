"""The cache manifest, typed, and its loading: what a cache holds and whether it is complete.

The cache folder holds `manifest.json` from the start, with `complete: false` and the run's identity (config
content hash, resolved dtype, corpus fingerprints, teacher hashes), so a rerun with a different config is refused.
It says `complete: true` only once every unit's shard is written; `writer.py` writes it, and the per-unit markers
that make `cache-logits` resumable. docs/cache-format.md describes every field.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from mdkd.pipeline.errors import UserError
from mdkd.pipeline.store import Folder, open_folder

SCHEMA_VERSION = 3
# Schema 1 (mdkd 0.1) lacks the tempered log-partitions: stage two can still read it, for `renormalize` only.
# Schema 2 takes the top-k over ids, not canonical tokens (twins outside it are not summed), and has no tail.
READABLE_SCHEMAS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
# What to do about a manifest this mdkd cannot use: cache-logits refuses to replace what it does not recognise.
_REBUILD = "move the cache folder away, or delete it, and rerun `mdkd cache-logits` to rebuild it"


def _inside_the_cache(path: str) -> str:
    """A path the manifest names must stay inside the cache folder: relative, no `..`, POSIX separators."""
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or ".." in parts or (parts and parts[0].endswith(":")):
        raise ValueError(f"{path!r} is not a path inside the cache folder")
    return path


CachePath = Annotated[str, AfterValidator(_inside_the_cache)]  # relative to the cache folder, and inside it


class _Record(BaseModel):
    # A field the reader does not know means the file is not what this code thinks it is.
    model_config = ConfigDict(extra="forbid")


class TeacherEntry(_Record):
    """One teacher as stage one saw it: where it came from, its vocabulary, its tokenizer copy in the cache."""

    model: str
    tokenizer_source: str
    revision: str | None
    weights: str
    model_type: str
    architecture: str
    vocab_size: int
    model_vocab_size: int
    special_token_ids: dict[str, int]
    languages: list[str]
    tokenizer_dir: CachePath
    tokenizer_hash: str


class ShardEntry(_Record):
    """One finished unit (teacher, language, part): its marker while the cache is written, then a manifest row."""

    teacher: str
    language: str
    part: int
    documents: int
    windows_without_tokens: int
    path: CachePath
    rows: int
    masked_positions: int
    bytes: int
    sha256: str


class CorpusEntry(_Record):
    """One corpus source of one language, as read by stage one."""

    language: str
    source: str
    fingerprint: str
    documents: int
    skipped_blank_lines: int
    skipped_invalid_utf8_lines: int


class Totals(_Record):
    rows: int
    masked_positions: int
    bytes: int


class Manifest(_Record):
    """`manifest.json`: what the cache holds and how it was made; the only file stage two reads besides shards
    and tokenizer copies."""

    schema_version: int
    mdkd_version: str
    complete: bool
    config: dict  # the resolved cache-logits config
    identity: dict
    masking: dict
    top_k: int
    temperatures: list[float]  # the tau of each cached tempered log-partition, in column order
    tail_samples: int = 0  # ids drawn per masked position outside the top-k (schema 3; 0: none)
    tail_temperature: float | None = None  # the tau they are drawn at (one of `temperatures`)
    max_length: int
    logprobs_dtype: str
    shard_documents: int
    corpus: list[CorpusEntry]
    teachers: dict[str, TeacherEntry]
    shards: list[ShardEntry] = []
    totals: Totals | None = None

    def shards_of(self, teacher: str | None = None, language: str | None = None) -> list[ShardEntry]:
        """The shards of one teacher and/or language, in manifest order."""
        return [s for s in self.shards if teacher in (None, s.teacher) and language in (None, s.language)]

    def languages(self) -> dict[str, list[str]]:
        """{language: teachers that cached it}, in manifest order."""
        cached: dict[str, list[str]] = {}
        for name, teacher in self.teachers.items():
            for language in teacher.languages:
                cached.setdefault(language, []).append(name)
        return cached

    def documents(self, language: str) -> int:
        """Documents of a language over all its sources."""
        return sum(entry.documents for entry in self.corpus if entry.language == language)

    @classmethod
    def load(cls, cache_dir: str | Path | Folder, require_complete: bool = True) -> Manifest:
        """Read DIR/manifest.json (DIR a local path or a URI); a missing, unreadable, unknown or (by default)
        incomplete one is a UserError."""
        folder = open_folder(cache_dir)
        path = folder.name(MANIFEST_NAME)
        if folder.size(MANIFEST_NAME) is None:
            raise UserError(f"{folder} is not an mdkd cache: no {MANIFEST_NAME} (run `mdkd cache-logits` first)")
        try:
            raw = json.loads(folder.read_text(MANIFEST_NAME))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc} ({_REBUILD})") from None
        manifest = cls.from_record(raw, path)
        if require_complete and not manifest.complete:
            raise UserError(f"cache {folder} is incomplete (rerun the same `mdkd cache-logits` command to finish it)")
        return manifest

    @classmethod
    def from_record(cls, raw, path: Path | str) -> Manifest:
        """A parsed manifest.json validated (a schema-1 one brought to today's shape); a UserError naming the first
        problem."""
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version not in READABLE_SCHEMAS or isinstance(version, bool):
            shown = f"{version!r} ({type(version).__name__})" if not isinstance(version, int) else str(version)
            readable = ", ".join(str(v) for v in READABLE_SCHEMAS)
            raise UserError(f"{path} has schema version {shown}; this mdkd reads the integers {readable} ({_REBUILD})")
        if version == 1:
            raw = _from_schema_1(raw)
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise UserError(f"{path} is damaged: {where}: {first['msg']} ({_REBUILD})") from None


def is_manifest(raw: dict) -> bool:
    """Whether a parsed record is a manifest this mdkd wrote and can read (complete or not)."""
    try:
        Manifest.from_record(raw, Path(MANIFEST_NAME))
    except UserError:
        return False
    return True


def _from_schema_1(raw: dict) -> dict:
    """A schema-1 manifest in today's shape: no temperatures, plain-hex shard hashes, one config hash fewer."""
    raw = {key: value for key, value in raw.items() if key != "config_hash"}
    raw["temperatures"] = []
    raw["shards"] = [{**s, "sha256": "sha256:" + s["sha256"]} for s in raw.get("shards", [])]
    return raw


def special_token_ids(tokenizer) -> dict[str, int]:
    """A tokenizer's named special tokens (cls, sep, pad, mask, unk, bos, eos) and their ids, as the manifest
    records them for each teacher."""
    ids = {}
    for role in ("cls", "sep", "pad", "mask", "unk", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            ids[role] = int(token_id)
    return ids
