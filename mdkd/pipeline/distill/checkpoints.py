"""Training checkpoints that a resume can trust: what is loaded is what mdkd wrote, and nothing in it runs code.

DeepSpeed writes a checkpoint as pickles (`torch.save`) into `RUN/checkpoints/step-NNNNNNN/` and loads them with
`weights_only=False`, which executes whatever a crafted file asks. So:
- after every save, rank 0 writes `mdkd-checkpoint.json` into the checkpoint's folder, last: the config hash, the
  step, and the size and sha256 of every file DeepSpeed wrote there;
- before any load, that record is checked (the config hash, every file's size and hash, no unlisted file), and
  the load itself goes through `WeightsOnlyCheckpointEngine`: `torch.load(weights_only=True)`, which builds
  tensors, containers and plain values only, plus the few DeepSpeed types its optimizer states hold.
A checkpoint without a valid record (a save cut short, another tool's, or one edited since) is never loaded;
`--resume auto` takes the newest one that passes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mdkd.pipeline.files import sha256_of_file, write_json_atomic

RECORD = "mdkd-checkpoint.json"
_TAG = re.compile(r"^step-(\d{7})$")


def tag_of(step: int) -> str:
    return f"step-{step:07d}"


def write_record(folder: Path, config_hash: str, step: int) -> None:
    """Rank 0, once every rank's files of the checkpoint in `folder` are written."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != RECORD
    }
    write_json_atomic(folder / RECORD, {"config_hash": config_hash, "step": step, "files": files})


def check(folder: Path, config_hash: str) -> tuple[int | None, str | None]:
    """(the checkpoint's step, None) when `folder` holds a checkpoint of this config exactly as mdkd wrote it;
    otherwise (None, what is wrong)."""
    if not folder.is_dir():
        return None, f"checkpoint {folder} does not exist"
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        files, step, written_by = record["files"], int(record["step"]), record["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return (
            None,
            f"checkpoint {folder} has no readable {RECORD} (not written by mdkd train, or its save was cut short)",
        )
    if written_by != config_hash:
        return None, f"checkpoint {folder} was written by a different config"
    present = {path.name for path in folder.iterdir() if path.is_file() and path.name != RECORD}
    if present != set(files):
        return (
            None,
            f"checkpoint {folder} holds other files than mdkd recorded ({', '.join(sorted(present ^ set(files)))})",
        )
    for name, expected in files.items():
        path = folder / name
        if path.stat().st_size != expected["bytes"] or sha256_of_file(path) != expected["sha256"]:
            return None, f"checkpoint {folder}: {name} differs from what mdkd recorded (damaged or replaced)"
    return step, None


def newest_valid(checkpoints: Path, config_hash: str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under `checkpoints` that passes `check` (None when none does), and why each newer one
    was passed over."""
    tags = sorted(
        (int(match.group(1)), path)
        for path in (checkpoints.iterdir() if checkpoints.is_dir() else ())
        if path.is_dir() and (match := _TAG.match(path.name))
    )
    passed_over = []
    for _, folder in reversed(tags):
        _, problem = check(folder, config_hash)
        if problem is None:
            return folder, passed_over
        passed_over.append(problem)
    return None, passed_over


def _deepspeed_globals() -> list:
    """The DeepSpeed types its optimizer states pickle (ZeRO 1-3), allowed beside tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def install_weights_only_loading(engine) -> bool:
    """Make `engine.load_checkpoint` read with `weights_only=True`; False (and nothing changed) when the engine
    uses another checkpoint engine than DeepSpeed's default, which mdkd cannot vouch for."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return False

    # Defined here: DeepSpeed is imported only by the stage that trains (it is slow to import and talks on import).
    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)  # the same settings, with a safe `load`
    engine.checkpoint_engine = safe
    return True
