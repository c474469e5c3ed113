"""Taking over an output folder, the same way for a cache, a training run and the demo.

An output folder holds a record file (the cache's manifest.json, a run's run.json, the demo's demo.json) with
the identity of what is being built and whether it is complete. A command pointed at a folder:
- whose record has the same identity and says complete: has nothing to do;
- whose record has the same identity and is not complete: resumes (where resuming is allowed);
- whose record has another identity, or an unfinished one that may not be resumed: is refused unless
  --overwrite, which empties the folder and starts again;
- whose record file mdkd cannot recognise as its own record of that kind (unreadable, another tool's, another
  kind's): is refused, with --overwrite too;
- that is empty or missing: starts; one that holds other files is refused, so nothing of the user's is deleted.

One process at a time writes a local folder: rank 0 holds an advisory lock (`.mdkd.lock`, naming its host and pid)
from the moment it takes the folder over until the process ends, and a second process is refused at once. A cache
on an object store (a URI) has no lock: its record object is the claim, read by every rank; two writers on one
prefix at once are not supported, and keeping them apart is the user's part (docs/cache-format.md, "On object
stores"). A run on a store is claimed in its local working copy, locked as any local folder (`RunFolder.open`).
Every rank decides with `claim_folder` before rank 0 changes anything with `prepare_folder`; `take_over` is that
sequence for a command running on one or many ranks.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mdkd.pipeline.distributed import Ranks, barrier
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.store import open_folder

LOCK_NAME = ".mdkd.lock"


@dataclass(frozen=True)
class FolderClaim:
    """What to do with an output folder: `complete` (nothing), `resume`, `new` or `replace` (empty it, then new)."""

    folder: Path | str  # a local path, or a URI
    action: Literal["complete", "resume", "new", "replace"]
    record: dict | None  # the existing record, when there is one to finish or to skip


def claim_folder(
    folder: Path | str,
    record_name: str,
    identity: dict,
    *,
    what: str,
    is_record: Callable[[dict], bool],
    overwrite: bool,
    resume: bool,
    resume_hint: str = "",
    folder_option: str = "--out",
    resume_only: bool = False,
) -> FolderClaim:
    """Decide what to do with `folder` (see the module docstring); bad cases are UserErrors that say the way out.

    `what` names the folder's content in messages ("cache", "run"); `is_record` tells a record mdkd wrote for this
    kind of folder; `resume_hint` says how to resume when `resume` is false but the folder holds an unfinished run
    of the same identity; `folder_option` is the command's option that chose the folder; `resume_only` (an
    explicit --resume) refuses a folder with nothing to resume.
    """
    store = open_folder(folder)
    if store.exists(record_name):
        try:
            record = json.loads(store.read_text(record_name))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or not is_record(record):
            raise UserError(
                f"{folder} holds a {record_name} that is not an mdkd {what} record (damaged, or another tool's), so "
                f"nothing there is replaced (move the folder away, or choose another {folder_option})"
            )
        same = record.get("identity") == identity
        if same and record.get("complete"):
            return FolderClaim(folder, "complete", record)
        if same and resume:
            return FolderClaim(folder, "resume", record)
        if overwrite:
            return FolderClaim(folder, "replace", None)
        if same:
            raise UserError(
                f"{folder} holds an unfinished {what} of this config ({resume_hint}, or pass --overwrite to restart it)"
            )
        raise UserError(
            f"{folder} holds a {what} with a different config or inputs (choose another {folder_option}, "
            "or pass --overwrite to replace it)"
        )
    if resume_only:
        raise UserError(f"nothing to resume in {folder}: it holds no {what} (drop --resume to start one)")
    if store.holds_anything_but({LOCK_NAME}):
        raise UserError(
            f"{folder} is not empty and is not an mdkd {what} (choose an empty or new {folder_option} folder)"
        )
    return FolderClaim(folder, "new", None)


def prepare_folder(claim: FolderClaim) -> None:
    """Rank 0 only, after every rank has claimed: empty a replaced folder (the folder itself stays, so a symbolic
    link to it keeps working; so does the lock) and make sure the folder exists."""
    store = open_folder(claim.folder)
    if claim.action == "replace":
        store.empty_except({LOCK_NAME})
    store.make()


def take_over(
    folder: Path | str,
    record_name: str,
    identity: dict,
    ranks: Ranks,
    *,
    what: str,
    is_record: Callable[[dict], bool],
    overwrite: bool,
    resume: bool,
    resume_hint: str = "",
    folder_option: str = "--out",
    resume_only: bool = False,
    start: Callable[[FolderClaim], None] | None = None,
) -> FolderClaim:
    """The claim sequence of every command that writes an output folder: rank 0 takes the folder's lock, every
    rank claims (`claim_folder`) and waits until all have, so nobody reads the folder after rank 0 changed it;
    unless the folder is complete already, rank 0 prepares it and runs `start(claim)` (the first records: a record
    file saying "not complete", say) while the others wait. A claim of `complete` touches nothing."""
    store = open_folder(folder)
    if ranks.is_main and store.is_local:
        lock_folder(store.path, folder_option)
    claim = claim_folder(
        folder,
        record_name,
        identity,
        what=what,
        is_record=is_record,
        overwrite=overwrite,
        resume=resume,
        resume_hint=resume_hint,
        folder_option=folder_option,
        resume_only=resume_only,
    )
    barrier(ranks)
    if claim.action == "complete":
        return claim
    if ranks.is_main:
        prepare_folder(claim)
        if start is not None:
            start(claim)
    barrier(ranks)
    return claim


# Folders this process holds the lock of: a process may take over the same folder again (a rerun inside one
# Python session, the demo's steps); the locks end with the process.
_held: dict[Path, int] = {}


def lock_folder(folder: Path, folder_option: str = "--out") -> None:
    """Take `folder`'s advisory lock for the rest of this process, creating the folder if needed; a UserError
    naming the holder when another process has it."""
    key = folder.resolve()
    if key in _held:
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise UserError(
                f"{folder} is being written by another mdkd ({holder}); wait for it to finish, or choose another "
                f"{folder_option}"
            ) from None
        # The holder before us may have removed the file as it ended: then ours is a lock on nothing; retry.
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)
    holder = {"host": socket.gethostname(), "pid": os.getpid()}
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(holder).encode())
    _held[key] = descriptor
    atexit.register(_release, path, descriptor, folder if created else None)


def _read_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        return f"host {holder['host']}, pid {holder['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _release(path: Path, descriptor: int, created: Path | None) -> None:
    """At exit: remove the lock file while still holding it, then let go; a folder this process only created to
    hold the lock (nothing else was ever written there) goes too."""
    try:
        path.unlink()
        if created is not None and not any(created.iterdir()):
            created.rmdir()
    except OSError:
        pass
    os.close(descriptor)
