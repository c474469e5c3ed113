"""Taking over an output folder, the same way for a cache, a training run and the demo.

An output folder holds a record file (the cache's manifest.json, a run's run.json, the demo's demo.json) with
the identity of what is being built and whether it is complete. A command pointed at a folder:
- whose record has the same identity and says complete: has nothing to do;
- whose record has the same identity and is not complete: resumes (where resuming is allowed);
- whose record has another identity, or an unfinished one that may not be resumed: is refused unless
  --overwrite, which replaces the folder;
- that is empty or missing: starts; one that holds other files is refused, so nothing of the user's is deleted.
Every rank decides with `claim_folder` before rank 0 changes anything with `prepare_folder`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
) -> FolderClaim:
    """Decide what to do with `folder` (see the module docstring); bad cases are UserErrors that say the way out.

    `what` names the folder's content in messages ("cache", "run"); `resume_hint` says how to resume when
    `resume` is false but the folder holds an unfinished run of the same identity; `folder_option` is the command's
    option that chose the folder.
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
