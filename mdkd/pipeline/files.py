"""Files on disk that other processes (a rerun, another rank, the next stage) rely on: atomic JSON and hashes.

One hash format everywhere a hash is recorded: `sha256:<hex>`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file, fsync, then rename: a reader (or a rerun after a crash or power loss)
    sees the old file or the new one, never half of one. The folder is synced too, so the rename itself lasts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so renames into it survive a crash (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_of_file(path: Path) -> str:
    """`sha256:<hex>` of one file's bytes (the same hex as `sha256sum`)."""
    return _sha256([path], names=False)


def sha256_of_files(paths: list[Path]) -> str:
    """`sha256:<hex>` over the names and bytes of `paths`, in the given order (a renamed file changes it)."""
    return _sha256(paths, names=True)


def _sha256(paths: list[Path], names: bool) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if names:
            digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def sha256_of_folder(folder: Path) -> str:
    """`sha256:<hex>` over the files directly in `folder`, in name order."""
    return sha256_of_files(sorted(p for p in folder.iterdir() if p.is_file()))


def content_hash(data) -> str:
    """`sha256:<hex>` of JSON-serialisable data (keys sorted): the identity of a resolved config."""
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before work whose result would be lost
    (an OSError names the folder otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".mdkd-write-test.{os.getpid()}.tmp"
    probe.write_bytes(b"")
    probe.unlink()
