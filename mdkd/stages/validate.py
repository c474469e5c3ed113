"""`mdkd validate FILE`: check a config without loading any model, and say every problem at once.

A file with a `corpus` key is a cache-logits config; any other is a train config.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mdkd.pipeline.config import read_yaml
from mdkd.pipeline.teacher_pass.config import CacheConfig, validate_cache_config
from mdkd.pipeline.distill.config import validate_train_config


def run(path: Path) -> BaseModel:
    """Validate `path`; raises ConfigError (with one entry per problem) when it is not valid."""
    raw = read_yaml(path)
    if isinstance(raw, dict) and "corpus" in raw:
        return validate_cache_config(raw, path)
    return validate_train_config(raw, path)


def describe(config: BaseModel) -> str:
    if isinstance(config, CacheConfig):
        teachers = ", ".join(f"{t.name} ({'/'.join(t.languages)})" for t in config.teachers)
        return f"a valid cache-logits config: {len(config.corpus)} corpus sources, teachers {teachers}"
    sizes = config.student.sizes()
    return (
        f"a valid train config: {config.train.steps} steps, student {sizes['num_layers']}x{sizes['hidden_size']}, "
        f"k'={config.loss.top_k}, tau={config.loss.temperature}, alpha {config.loss.alpha.schedule}"
    )
