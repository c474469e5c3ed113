"""The cache manifest and the per-unit completion markers that make `cache-logits` resumable.

The cache folder holds `manifest.json` from the start, with `complete: false` and the run's identity (resolved
config, corpus fingerprints, teacher hashes), so a rerun with a different config is refused. A unit of work is
one shard: (teacher, language, part). Its marker under `.progress/` is written only after the shard has been
renamed into place; a rerun skips units with a marker. When every unit has a marker, the markers are merged into
the manifest, which is rewritten with `complete: true`: only then does the cache count as written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mdkd.pipeline.errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = ".progress"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def shard_path(teacher: str, language: str, part: int) -> str:
    """Where a unit's shard lives, relative to the cache folder."""
    return f"{teacher}/{language}/part-{part:05d}.parquet"


def marker_path(cache_dir: Path, teacher: str, language: str, part: int) -> Path:
    return cache_dir / PROGRESS_DIR / teacher / language / f"part-{part:05d}.json"


def read_marker(cache_dir: Path, teacher: str, language: str, part: int) -> dict | None:
    """The finished unit's record, or None when the unit still has to run (no marker or a torn one)."""
    path = marker_path(cache_dir, teacher, language, part)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if (cache_dir / record.get("path", "")).is_file() else None


def load_manifest(cache_dir: Path, require_complete: bool = True) -> dict:
    """Read DIR/manifest.json; a missing, unreadable or (by default) incomplete manifest is a UserError."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{cache_dir} is not an mdkd cache: no {MANIFEST_NAME} (run `mdkd cache-logits` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc} (rerun `mdkd cache-logits` to rewrite it)") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {manifest.get('schema_version')}, this mdkd reads {SCHEMA_VERSION} "
            "(rebuild the cache with this version)"
        )
    if require_complete and not manifest.get("complete"):
        raise UserError(f"cache {cache_dir} is incomplete (rerun the same `mdkd cache-logits` command to finish it)")
    return manifest
