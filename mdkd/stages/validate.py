"""`mdkd validate FILE`: check a config without loading any model, and say every problem at once."""

from __future__ import annotations

from pathlib import Path

from mdkd.pipeline.config import CacheConfig, read_yaml, validate_cache_config


def run(path: Path) -> CacheConfig:
    """Validate `path`; raises ConfigError (with one entry per problem) when it is not valid."""
    return validate_cache_config(read_yaml(path), path)


def describe(config: CacheConfig) -> str:
    teachers = ", ".join(f"{t.name} ({'/'.join(t.languages)})" for t in config.teachers)
    return f"a valid cache-logits config: {len(config.corpus)} corpus sources, teachers {teachers}"
