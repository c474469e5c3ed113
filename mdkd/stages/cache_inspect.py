"""`mdkd cache inspect DIR`: what a cache holds, per teacher and language, at a glance.

Reads every shard's predictions once to report how confident each teacher is on each language: a teacher with a
low top-1 probability or a high entropy on a language is a weak choice to serve it. The top-k mass says how much
of the teacher a top-k target can carry: where it is small, `renormalize` distorts the teacher several-fold and
even `rest` pins down only the top-k (docs/training.md, "Choosing k and tau"); the command warns there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.vocab import TeacherVocabulary, TokenTally, build_alignment, teacher_token_shares
from mdkd.pipeline.distributed import Ranks

# Below this mean top-k mass (at temperature 1), the cached top-k holds too little of a teacher to stand for it.
LOW_TOPK_MASS = 0.5


@dataclass
class Inspection:
    rows: list[dict]  # one summary per (teacher, language), in manifest order
    token_shares: dict[str, dict]  # per teacher, `teacher_token_shares` over the union of every cached teacher
    warnings: list[str]


def collect(cache_dir: Path | str) -> Inspection:
    """Summaries per (teacher, language) and per teacher, and warnings. Entropies and tempered masses need a
    schema-2 cache; a schema-1 one reports only what its top-k gives."""
    cache = CacheReader(cache_dir)
    cache.require_intact(cache.manifest.shards, list(cache.manifest.teachers))
    temperatures = cache.manifest.temperatures
    vocabularies = {name: TeacherVocabulary.from_cache(cache, name) for name in cache.manifest.teachers}
    tallies = {
        name: TokenTally(np.zeros(len(v.canonical)), np.zeros(len(v.canonical)), 0) for name, v in vocabularies.items()
    }
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    bars = Ranks.from_env().progress_enabled()  # mdkd's one rule: rank 0, on a terminal
    for shard in tqdm(cache.manifest.shards, desc="reading shards", unit="shard", leave=False, disable=not bars):
        totals = sums[(shard.teacher, shard.language)]
        totals["rows"] += shard.rows
        totals["masked"] += shard.masked_positions
        totals["bytes"] += shard.bytes
        rows = cache.rows(shard)
        tallies[shard.teacher].add(rows)
        logprobs = rows.topk_logprobs.astype(np.float64)
        if logprobs.size == 0:
            continue
        totals["top1"] += np.exp(logprobs[:, 0]).sum()
        totals["mass"] += np.exp(logprobs).sum()
        if rows.log_partitions is not None:
            totals["entropy"] += rows.entropies.astype(np.float64).sum()
            for column, tau in enumerate(temperatures):
                tempered = np.exp(logprobs / tau - rows.log_partitions[:, column : column + 1].astype(np.float64))
                totals[f"mass_tau{tau:g}"] += tempered.sum()
    results = []
    for (teacher, language), totals in sums.items():
        masked = max(totals["masked"], 1)
        result = {
            "teacher": teacher,
            "language": language,
            "rows": int(totals["rows"]),
            "masked_positions": int(totals["masked"]),
            "bytes_per_position": totals["bytes"] / masked,
            "mean_top1_probability": totals["top1"] / masked,
            "mean_topk_mass": totals["mass"] / masked,
        }
        if temperatures:
            result["mean_entropy"] = totals["entropy"] / masked
            result.update({f"mean_topk_mass_tau{tau:g}": totals[f"mass_tau{tau:g}"] / masked for tau in temperatures})
        results.append(result)
    alignment = build_alignment(list(vocabularies.values()))
    shares = {name: teacher_token_shares(alignment, name, tally) for name, tally in tallies.items()}
    return Inspection(results, shares, _warnings(results, cache.manifest.top_k, cache.manifest.tail_samples))


def _warnings(rows: list[dict], top_k: int, tail_samples: int) -> list[str]:
    """One line per (teacher, language) whose cached top-k holds little of the teacher's probability; what that
    leaves unpinned depends on whether the cache drew a tail."""
    inside = (
        f"the cache's {tail_samples} tail draws per position estimate the rest"
        if tail_samples
        else "without tail draws (cache config `tail_samples`) the inside of the rest is free"
    )
    return [
        f"warning: the top-{top_k} of {r['teacher']} on {r['language']} holds {r['mean_topk_mass']:.0%} of its "
        f"probability mass: `loss.missing_mass: renormalize` would distort it, and {inside} (see "
        "docs/training.md, 'Choosing k and tau')"
        for r in rows
        if r["mean_topk_mass"] < LOW_TOPK_MASS
    ]


def render_shares(shares: dict[str, dict]) -> str:
    """Per teacher: the share of its inputs and of its top-k mass on shared, never-emitted and dropped tokens."""
    lines = ["where each teacher's tokens land in the merged vocabulary of all cached teachers (inputs / top-k mass):"]
    for name, found in shares.items():
        parts = [
            f"{kind.replace('_', ' ')} {found['input'][kind]:.1%} / {found['topk'][kind]:.1%}"
            for kind in ("shared", "never_emitted", "dropped")
        ]
        lines.append(f"  {name}: " + ", ".join(parts))
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    """A plain aligned text table."""
    tempered = [key for key in (rows[0] if rows else {}) if key.startswith("mean_topk_mass_tau")]
    headers = ["teacher", "language", "rows", "masked", "bytes/pos", "top1 p", "top-k mass"]
    headers += [f"mass tau={key.removeprefix('mean_topk_mass_tau')}" for key in tempered]
    headers += ["entropy"] if rows and "mean_entropy" in rows[0] else []
    cells = [headers]
    for r in rows:
        line = [
            r["teacher"],
            r["language"],
            str(r["rows"]),
            str(r["masked_positions"]),
            f"{r['bytes_per_position']:.1f}",
            f"{r['mean_top1_probability']:.3f}",
            f"{r['mean_topk_mass']:.3f}",
        ]
        line += [f"{r[key]:.3f}" for key in tempered]
        line += [f"{r['mean_entropy']:.3f}"] if "mean_entropy" in r else []
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])
