"""What identifies a model's weights, the same way in both stages: stage one records it for every teacher in the
manifest, and stage two checks a student's body against that record before inheriting its weights.

A local folder is identified by the sha256 of its weight files (names and bytes, in name order); a hub model by
the commit the hub resolved its revision to, so that a later push to the repository is noticed.
"""

from __future__ import annotations

from pathlib import Path

from mdkd.pipeline.files import sha256_of_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a local checkpoint folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def weights_identity(model: str, revision: str | None, config) -> str:
    """The identity of `model`'s weights (a local folder or a hub id), given its loaded transformers config."""
    local = Path(model)
    if local.is_dir():
        return sha256_of_files(weight_files(local))
    return f"hub:{model}@{getattr(config, '_commit_hash', None) or revision or 'main'}"
