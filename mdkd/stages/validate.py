"""`mdkd validate FILE [--cache DIR]`: check a config without loading any model, and say every problem at once.

A file with a `corpus` key is a cache-logits config; any other is a train config, which `--cache` also checks
against a cache (teachers, languages, k', temperature, and a student's body: its weights are hashed and compared
with what stage one cached, none loaded).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mdkd.pipeline.cache.manifest import Manifest
from mdkd.pipeline.config import ConfigError, read_yaml
from mdkd.pipeline.distill.config import validate_train_config
from mdkd.pipeline.distill.inherit import body_problems
from mdkd.pipeline.distill.plan import check_against_cache
from mdkd.pipeline.teacher_pass.config import CacheConfig, validate_cache_config


def run(path: Path, cache_dir: Path | str | None = None) -> BaseModel:
    """Validate `path` (and a train config against `cache_dir`); raises ConfigError (one entry per problem)."""
    raw = read_yaml(path)
    if isinstance(raw, dict) and "corpus" in raw:
        return validate_cache_config(raw, path)
    config = validate_train_config(raw, path)
    if cache_dir is not None:
        manifest = Manifest.load(cache_dir)
        _, problems = check_against_cache(config, manifest)
        # A student's body is checked against what stage one cached: its config is read, its weights hashed.
        problems += body_problems(config.student, manifest)
        if problems:
            raise ConfigError(path, problems)
    return config


def describe(config: BaseModel) -> str:
    if isinstance(config, CacheConfig):
        teachers = ", ".join(f"{t.name} ({'/'.join(t.languages)})" for t in config.teachers)
        return f"a valid cache-logits config: {len(config.corpus)} corpus sources, teachers {teachers}"
    if config.student.init is None:
        sizes = config.student.sizes()
        student = f"student {sizes['num_layers']}x{sizes['hidden_size']}"
    else:
        layers = config.student.init.layers
        student = f"student inherits {config.student.init.teacher}" + (f" (layers {layers})" if layers else "")
    return (
        f"a valid train config: {config.train.steps} steps, {student}, "
        f"k'={config.loss.top_k}, tau={config.loss.temperature}, alpha {config.loss.alpha.schedule}"
    )
