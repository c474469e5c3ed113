"""`mdkd cache inspect DIR`: what a cache holds, per teacher and language, at a glance.

Reads every shard's predictions once to report how confident each teacher is on each language: a teacher
with a low top-1 probability or a high entropy on a language is a weak choice to serve it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from mdkd.pipeline.cache.manifest import load_manifest
from mdkd.pipeline.cache.shards import read_shard

HEADERS = ("teacher", "language", "rows", "masked", "bytes/pos", "top1 p", "top-k mass", "entropy")


def collect(cache_dir: Path) -> list[dict]:
    """One summary dict per (teacher, language), in manifest order."""
    manifest = load_manifest(cache_dir)
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for shard in tqdm(manifest["shards"], desc="reading shards", unit="shard", leave=False, disable=None):
        key = (shard["teacher"], shard["language"])
        totals = sums[key]
        totals["rows"] += shard["rows"]
        totals["masked"] += shard["masked_positions"]
        totals["bytes"] += shard["bytes"]
        column = read_shard(cache_dir / shard["path"], ["topk_logprobs"]).column("topk_logprobs")
        flat = pc.list_flatten(pc.list_flatten(column)).to_numpy(zero_copy_only=False).astype(np.float64)
        if flat.size == 0:
            continue
        logprobs = flat.reshape(-1, manifest["top_k"])
        probs = np.exp(logprobs)
        mass = probs.sum(axis=1)
        renormalised = probs / mass[:, None]
        totals["top1"] += probs[:, 0].sum()
        totals["mass"] += mass.sum()
        totals["entropy"] += -(renormalised * np.log(np.maximum(renormalised, 1e-30))).sum()
    rows = []
    for (teacher, language), totals in sums.items():
        masked = max(totals["masked"], 1)
        rows.append(
            {
                "teacher": teacher,
                "language": language,
                "rows": int(totals["rows"]),
                "masked_positions": int(totals["masked"]),
                "bytes_per_position": totals["bytes"] / masked,
                "mean_top1_probability": totals["top1"] / masked,
                "mean_topk_mass": totals["mass"] / masked,
                "mean_topk_entropy": totals["entropy"] / masked,
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    """A plain aligned text table."""
    cells = [HEADERS] + [
        (
            r["teacher"],
            r["language"],
            str(r["rows"]),
            str(r["masked_positions"]),
            f"{r['bytes_per_position']:.1f}",
            f"{r['mean_top1_probability']:.3f}",
            f"{r['mean_topk_mass']:.3f}",
            f"{r['mean_topk_entropy']:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])
