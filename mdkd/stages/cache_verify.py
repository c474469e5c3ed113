"""`mdkd cache verify DIR`: check every shard against the manifest before trusting a cache.

The checks are the cache's own (`mdkd.pipeline.cache.verify`); this recipe opens the cache and shows progress.
Returns the list of problems; the CLI exits non-zero when there is any.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.verify import find_problems
from mdkd.pipeline.distributed import Ranks


def verify(cache_dir: Path | str) -> list[str]:
    """Every problem found, as `path: what is wrong` lines; empty when the cache is sound."""
    bars = Ranks.from_env().progress_enabled()  # mdkd's one rule: rank 0, on a terminal
    return find_problems(
        CacheReader(cache_dir),
        progress=lambda shards: tqdm(shards, desc="verifying", unit="shard", leave=False, disable=not bars),
    )
