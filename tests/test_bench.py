"""The benchmarks in bench/ still run: each at its tiny size, as a subprocess, exactly as a user starts it.

Nothing here checks a timing against a threshold (they depend on the machine); only that every figure is there
and sane: positive times and rates, ratios above 0, and the set-up checks the benchmarks report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run_bench(script: str, *flags: str) -> dict:
    """Run `python bench/<script> --tiny <flags>` from the repository root; return its last stdout line's JSON."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--tiny", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    lines = result.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing on stdout"
    return json.loads(lines[-1])


def positive(*values) -> bool:
    return all(isinstance(value, (int, float)) and value > 0 for value in values)


def test_cache_logits_benchmark_reports_every_figure():
    figures = run_bench("cache_logits.py")
    assert {"machine", "setup", "end_to_end", "bare_forward", "head", "bytes_per_position", "peak_rss"} <= set(figures)
    assert figures["setup"]["preset"] == "tiny"

    end_to_end = figures["end_to_end"]
    counts = end_to_end["counts"]
    assert positive(
        end_to_end["total_s"],
        end_to_end["steady_s"],
        end_to_end["one_off_s"],
        end_to_end["units_s"],
        end_to_end["cold_run_s"],
        end_to_end["tokens_per_s"],
        end_to_end["tokens_per_s_without_one_offs"],
        end_to_end["tokens_per_s_in_units"],
        end_to_end["logged_unit_tokens_per_s_median"],
    )
    assert positive(counts["tokens"], counts["rows"], counts["masked_positions"], counts["bytes"], counts["shards"])
    assert end_to_end["units"] == counts["shards"], "one logged event per unit"
    assert set(end_to_end["one_offs_s"]) == {"corpus_scan", "teacher_checks", "model_load"}
    assert end_to_end["shards_identical_across_rounds"] is True

    bare = figures["bare_forward"]
    assert positive(
        bare["seconds"],
        bare["batches"],
        bare["tokens_per_s"],
        bare["overhead_ratio_with_one_offs"],
        bare["overhead_ratio_without_one_offs"],
        bare["logged_units_over_bare"],
        bare["unit_work_alone_over_bare"],
        bare["logged_units_over_unit_work_alone"],
    )
    assert positive(*bare["unit_work_alone_s"].values())
    assert all(ratio > 0 for ratio in bare["overhead_ratio_without_one_offs_per_round"])
    assert bare["max_abs_logprob_difference_vs_cache"] < 1e-4, "the rebuilt batches are not the run's"

    head = figures["head"]
    assert positive(head["masked_only_s"], head["full_forward_s"], head["full_over_masked"])
    assert head["max_abs_logit_difference"] < 1e-3, "masked-only and full heads disagree"

    sizes = figures["bytes_per_position"]
    assert positive(sizes["float32"], sizes["float16"])
    assert sizes["float16"] < sizes["float32"]

    runs = figures["peak_rss"]["runs"]
    assert len(runs) == 2 and all(positive(run["peak_rss_mb"], run["rss_after_imports_mb"]) for run in runs.values())


def test_train_benchmark_reports_every_figure():
    figures = run_bench("train.py", "--steps", "2")
    assert figures["preset"] == "tiny"
    assert figures["missing_mass"] in ("rest", "renormalize")
    assert positive(
        figures["step_seconds_mlm"],
        figures["step_seconds_cache"],
        figures["step_seconds_online"],
        figures["cache_over_mlm"],
        figures["online_over_cache"],
        figures["read_positions_per_second"],
        figures["read_rows"],
        figures["positions_per_step"],
        figures["positions_consumed_per_second"],
        figures["bench_cache_tokens_per_second"],
        figures["stage_seconds"],
        figures["stage_tokens_per_second"],
        figures["student_vocabulary"],
        figures["peak_rss_mb"],
    )
    assert figures["timed_steps"] == 2
    assert figures["stage_steps"] == len(figures["stage_all_tokens_per_second"]) == 2 + 2, "timed + warm-up steps"
