"""The invariants of a written cache, which `mdkd cache verify` checks before a cache is trusted.

Catches truncated or corrupted files (size, sha256), shards that no longer parse, and rows whose lists do not
line up (positions, labels and top-k of different lengths, positions outside the window, ids outside the
teacher's vocabulary), as well as tokenizer copies that are missing or differ from their recorded hash, paths
that leave the cache folder, and shards the manifest does not list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow.compute as pc

from mdkd.pipeline.cache.manifest import ShardEntry
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import COLUMNS_BY_SCHEMA


def find_problems(cache: CacheReader, progress: Callable[[list[ShardEntry]], Iterable[ShardEntry]] = iter) -> list[str]:
    """Every problem found, as `path: what is wrong` lines; empty when the cache is sound. `progress` wraps the
    shard list (a progress bar, say)."""
    manifest = cache.manifest
    problems = [problem for name in manifest.teachers if (problem := cache.check_tokenizer_copy(name))]
    for shard in progress(manifest.shards):
        where = shard.path
        file_problem = cache.check_file(shard, reread=True)  # on an object store: the object's own bytes
        if file_problem:
            problems.append(file_problem)
            continue
        try:
            table = cache.table(shard)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            problems.append(f"{where}: cannot be read as Parquet ({exc})")
            continue
        if tuple(table.column_names) != COLUMNS_BY_SCHEMA[manifest.schema_version]:
            problems.append(f"{where}: columns {table.column_names} differ from the cache format")
            continue
        masked = int(pc.sum(pc.list_value_length(table.column("positions"))).as_py() or 0)
        if table.num_rows != shard.rows or masked != shard.masked_positions:
            problems.append(
                f"{where}: {table.num_rows} rows / {masked} positions, manifest says "
                f"{shard.rows} / {shard.masked_positions}"
            )
        vocab_size = manifest.teachers[shard.teacher].vocab_size
        problems.extend(f"{where}: {p}" for p in _check_rows(table, manifest.top_k, vocab_size, manifest.temperatures))
        if manifest.schema_version >= 3:
            problems.extend(f"{where}: {p}" for p in _check_tail(table, manifest.tail_samples, vocab_size))
    problems.extend(f"{relative}: not listed in the manifest" for relative in cache.unlisted_shards())
    return problems


def _check_rows(table, top_k: int, vocab_size: int, temperatures: list[float]) -> list[str]:
    """A shard's rows: list lengths that line up, positions inside their window, ids inside the vocabulary, and
    log-probabilities (and log-partitions) that a teacher's distribution can have."""
    problems = []
    window_lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    counts = pc.list_value_length(table.column("positions")).to_numpy()
    if not np.array_equal(pc.list_value_length(table.column("labels")).to_numpy(), counts):
        problems.append("labels and positions differ in length")
    for column in ("topk_ids", "topk_logprobs"):
        if not np.array_equal(pc.list_value_length(table.column(column)).to_numpy(), counts):
            problems.append(f"{column} and positions differ in length")
        inner = pc.list_value_length(pc.list_flatten(table.column(column))).to_numpy()
        if inner.size and (inner != top_k).any():
            problems.append(f"{column} has lists that are not {top_k} long")
    positions = pc.list_flatten(table.column("positions")).to_numpy()
    owners = np.repeat(np.arange(len(counts)), counts)
    if positions.size and ((positions < 0) | (positions >= window_lengths[owners])).any():
        problems.append("a masked position lies outside its window")
    ids = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy()
    if ids.size and ((ids < 0) | (ids >= vocab_size)).any():
        problems.append("a top-k id lies outside the teacher's vocabulary")
    values = pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy().astype(np.float64)
    if values.size and not problems:
        values = values.reshape(-1, top_k)
        # Monotone rounding keeps topk's order even in float16, so any increase means damaged data.
        if not np.isfinite(values).all() or (values > 1e-3).any() or (np.diff(values, axis=1) > 0).any():
            problems.append("top-k log-probabilities are not finite, non-positive and in descending order")
        elif (np.exp(values).sum(axis=1) > 1.0 + 1e-2).any():
            problems.append("top-k probabilities sum to more than 1")
        elif temperatures:
            problems.extend(_check_log_partitions(table, values, temperatures, counts))
    return problems


def _check_log_partitions(table, logprobs: np.ndarray, temperatures: list[float], counts: np.ndarray) -> list[str]:
    """One finite log-partition per temperature, the top-k's tempered mass under it at most one, and one finite
    non-negative entropy per position."""
    column = table.column("log_partitions")
    if not np.array_equal(pc.list_value_length(column).to_numpy(), counts):
        return ["log_partitions and positions differ in length"]
    inner = pc.list_value_length(pc.list_flatten(column)).to_numpy()
    if inner.size and (inner != len(temperatures)).any():
        return [f"log_partitions has lists that are not {len(temperatures)} long (one per temperature)"]
    partitions = pc.list_flatten(pc.list_flatten(column)).to_numpy().astype(np.float64).reshape(-1, len(temperatures))
    if not np.isfinite(partitions).all():
        return ["log_partitions are not finite"]
    entropies = table.column("entropies")
    if not np.array_equal(pc.list_value_length(entropies).to_numpy(), counts):
        return ["entropies and positions differ in length"]
    values = pc.list_flatten(entropies).to_numpy()
    if values.size and (~np.isfinite(values) | (values < -1e-3)).any():
        return ["entropies are not finite and non-negative"]
    for index, tau in enumerate(temperatures):
        tempered_mass = np.exp(logprobs / tau - partitions[:, index : index + 1]).sum(axis=1)
        if (tempered_mass > 1.0 + 1e-2).any():
            return [f"the top-k's tempered probabilities at tau {tau:g} sum to more than 1 (log_partitions damaged)"]
    return []


def _check_tail(table, samples: int, vocab_size: int) -> list[str]:
    """The sampled tail: three lists that line up per position, distinct ascending ids in the vocabulary and
    outside the position's top-k, counts that add up to the draws, log-probabilities no higher than the k-th."""
    counts = pc.list_value_length(table.column("positions")).to_numpy()
    lengths = {}
    for column in ("tail_ids", "tail_counts", "tail_logprobs"):
        if not np.array_equal(pc.list_value_length(table.column(column)).to_numpy(), counts):
            return [f"{column} and positions differ in length"]
        lengths[column] = pc.list_value_length(pc.list_flatten(table.column(column))).to_numpy()
    if not (
        np.array_equal(lengths["tail_ids"], lengths["tail_counts"])
        and np.array_equal(lengths["tail_ids"], lengths["tail_logprobs"])
    ):
        return ["tail_ids, tail_counts and tail_logprobs differ in length"]
    per_position = lengths["tail_ids"]
    if not samples:
        return [] if not per_position.any() else ["a tail is stored, but the manifest says no samples were drawn"]
    ids = pc.list_flatten(pc.list_flatten(table.column("tail_ids"))).to_numpy().astype(np.int64)
    draws = pc.list_flatten(pc.list_flatten(table.column("tail_counts"))).to_numpy().astype(np.int64)
    values = pc.list_flatten(pc.list_flatten(table.column("tail_logprobs"))).to_numpy().astype(np.float64)
    owner = np.repeat(np.arange(len(per_position)), per_position)
    totals = np.bincount(owner, weights=draws, minlength=len(per_position))
    if ((totals != samples) & (per_position > 0)).any() or (draws < 1).any():
        return [f"tail counts do not add up to the {samples} draws of a position"]
    if ((ids < 0) | (ids >= vocab_size)).any():
        return ["a tail id lies outside the teacher's vocabulary"]
    same_position = owner[1:] == owner[:-1]
    if (same_position & (ids[1:] <= ids[:-1])).any():
        return ["tail ids are not distinct and ascending within a position"]
    top = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy().reshape(len(per_position), -1)
    if (top[owner] == ids[:, None]).any():
        return ["a tail id is one of its position's top-k"]
    kth = pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy().astype(np.float64)
    kth = kth.reshape(len(per_position), -1)[:, -1]
    if not np.isfinite(values).all() or (values > kth[owner] + 1e-3).any():
        return ["tail log-probabilities are not finite and below the top-k's"]
    return []
