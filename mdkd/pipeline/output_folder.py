"""Taking over an output folder, the same way for a cache, a training run and the demo.

An output folder holds a record file (the cache's manifest.json, a run's run.json, the demo's demo.json) with
the identity of what is being built and whether it is complete. A command pointed at a folder:
- whose record has the same identity and says complete: has nothing to do;
- whose record has the same identity and is not complete: resumes (where resuming is allowed);
- whose record has another identity, or an unfinished one that may not be resumed: is refused unless
  --overwrite, which replaces the folder;
- that is empty or missing: starts; one that holds other files is refused, so nothing of the user's is deleted.
Every rank decides with `claim_folder` before rank 0 changes anything with `prepare_folder`; `take_over` is that
sequence for a command running on one or many ranks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mdkd.pipeline.distributed import Ranks, barrier
from mdkd.pipeline.errors import UserError


@dataclass(frozen=True)
class FolderClaim:
    """What to do with an output folder: `complete` (nothing), `resume`, `new` or `replace` (delete, then new)."""

    folder: Path
    action: Literal["complete", "resume", "new", "replace"]
    record: dict | None  # the existing record, when there is one to finish or to skip


def claim_folder(
    folder: Path,
    record_name: str,
    identity: dict,
    *,
    what: str,
    overwrite: bool,
    resume: bool,
    resume_hint: str = "",
    folder_option: str = "--out",
    resume_only: bool = False,
) -> FolderClaim:
    """Decide what to do with `folder` (see the module docstring); bad cases are UserErrors that say the way out.

    `what` names the folder's content in messages ("cache", "run"); `resume_hint` says how to resume when
    `resume` is false but the folder holds an unfinished run of the same identity; `folder_option` is the command's
    option that chose the folder; `resume_only` (an explicit --resume) refuses a folder with nothing to resume.
    """
    record_file = folder / record_name
    if record_file.exists():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            record = {}
        same = isinstance(record, dict) and record.get("identity") == identity
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
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"{folder} is not empty and is not an mdkd {what} (choose an empty or new {folder_option} folder)"
        )
    return FolderClaim(folder, "new", None)


def prepare_folder(claim: FolderClaim) -> None:
    """Rank 0 only, after every rank has claimed: clear a replaced folder and make sure the folder exists."""
    if claim.action == "replace":
        shutil.rmtree(claim.folder)
    claim.folder.mkdir(parents=True, exist_ok=True)


def take_over(
    folder: Path,
    record_name: str,
    identity: dict,
    ranks: Ranks,
    *,
    what: str,
    overwrite: bool,
    resume: bool,
    resume_hint: str = "",
    folder_option: str = "--out",
    resume_only: bool = False,
    start: Callable[[FolderClaim], None] | None = None,
) -> FolderClaim:
    """The claim sequence of every command that writes an output folder: every rank claims (`claim_folder`) and waits
    until all have, so nobody reads the folder after rank 0 changed it; unless the folder is complete already, rank
    0 prepares it and runs `start(claim)` (the first records: a record file saying "not complete", say) while the
    others wait. A claim of `complete` touches nothing."""
    claim = claim_folder(
        folder,
        record_name,
        identity,
        what=what,
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
