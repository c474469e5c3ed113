"""The benchmarks in bench/ still run: each at its tiny size, as a subprocess, exactly as a user starts it.

Nothing here checks a timing against a threshold (they depend on the machine). What is checked are the figures
that can be derived another way: counts against the corpus, the masking rule and each other, shard bytes against
the shard schema (docs/cache-format.md), the two head paths against each other, step counts and sizes against
the run's settings. The rest must be there and positive.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import train, train_config, write_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SPECIAL_TOKENS_PER_ROW = 2  # [CLS] and [SEP]: the benchmarks' teachers are BERTs
# Parquet footer of one shard: about 2.9 KB with this schema (docs/cache-format.md); 4 KB leaves room.
FOOTER_BYTES = 4000
# float16 keeps 10 of float32's 23 mantissa bits. In the output of an fp32 teacher with random weights the 13 it
# drops are noise that zstd cannot shrink: each float32 value costs at least 13 bits more than its float16 cast.
NOISE_BYTES_PER_FLOAT32 = 13 / 8


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
    setup = figures["setup"]
    assert setup["preset"] == "tiny"

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
    # One teacher, one language: a unit, and so a shard, per `shard_documents` documents.
    assert counts["shards"] == math.ceil(setup["documents"] / setup["shard_documents"])
    assert end_to_end["units"] == counts["shards"], "one logged event per unit"
    # The stage logs each unit's main-thread seconds, one unit after another inside the run that the benchmark
    # timed: the two clocks must agree that they fit (this fails if the log mixed in another run's units).
    assert end_to_end["units_s"] <= end_to_end["total_s"]
    assert set(end_to_end["one_offs_s"]) == {"corpus_scan", "teacher_checks", "model_load"}
    assert end_to_end["shards_identical_across_rounds"] is True

    # Rows are windows x copies. A document's windows hold at most max_length - 2 ordinary tokens each and all
    # but its last are full, so it has between (its tokens) / (max_length - 2) and that plus one windows, and at
    # least one (every generated document has words).
    copies, probability = setup["masking"]["copies"], setup["masking"]["probability"]
    ordinary = counts["tokens"] - SPECIAL_TOKENS_PER_ROW * counts["rows"]
    full_windows = ordinary / copies / (setup["max_length"] - SPECIAL_TOKENS_PER_ROW)
    assert counts["rows"] % copies == 0
    windows = counts["rows"] // copies
    assert max(setup["documents"], full_windows) <= windows <= setup["documents"] + full_windows, (windows, ordinary)
    # Each window gets max(1, round(n x probability)) masked positions among its n ordinary tokens, within one of
    # n x probability: the total is within one per row of the rate applied to all ordinary tokens.
    expected = probability * ordinary
    assert abs(counts["masked_positions"] - expected) <= counts["rows"], (counts["masked_positions"], expected)

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
    # The adapter only moves the MLM head after the gather: the same fp32 products, so the same logits and the same
    # log-probabilities (what the cache stores) up to float rounding.
    assert head["max_abs_logit_difference"] <= 1e-5, "masked-only and full heads disagree"
    assert head["max_abs_logprob_difference"] <= 1e-5, "masked-only and full heads give other log-probabilities"

    sizes = figures["bytes_per_position"]
    k, temperatures, positions = setup["top_k"], setup["temperatures"], counts["masked_positions"]
    # What grows per position before compression (docs/cache-format.md): 4k bytes of ids, 4 per temperature's
    # log-partition, 4 each for the entropy, the position and the label, and the row's input ids (4 per token),
    # besides the log-probabilities; the footers are the one cost that does not shrink. Compressed shards stay
    # below that, for float32 (4 bytes a log-probability) and float16 (2 bytes).
    uncompressed = 4 * k + 4 * len(temperatures) + 3 * 4 + 4 * counts["tokens"] / positions
    footers = FOOTER_BYTES * counts["shards"] / positions
    assert sizes["float32"] < uncompressed + 4 * k + footers, (sizes, uncompressed)
    assert sizes["float16"] < uncompressed + 2 * k + footers, (sizes, uncompressed)
    # The two figures differ by the log-probability column alone: at most the whole 4 bytes of each of the k
    # values, at least their 13 noise bits (1.5 bytes, for some slack).
    saved = sizes["float32"] - sizes["float16"]
    assert 1.5 * k <= saved <= 4 * k, saved
    # Above the incompressible part: the noise bits of the float32 values in every position (the entropy and the
    # log-partitions at tau != 1; at tau = 1 it is 0 up to rounding), and of the k log-probabilities in float32.
    noisy = 1 + sum(temperature != 1 for temperature in temperatures)
    assert sizes["float16"] > NOISE_BYTES_PER_FLOAT32 * noisy, sizes
    assert sizes["float32"] > NOISE_BYTES_PER_FLOAT32 * (noisy + k), sizes

    runs = figures["peak_rss"]["runs"]
    assert len(runs) == 2 and all(positive(run["peak_rss_mb"], run["rss_after_imports_mb"]) for run in runs.values())


def test_train_benchmark_reports_every_figure():
    timed_steps, warm_up_steps = 2, 2
    figures = run_bench("train.py", "--steps", str(timed_steps))
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
    assert figures["timed_steps"] == timed_steps
    # The stage runs as many steps as the benchmark times and warms up, and logs each one.
    assert figures["stage_steps"] == len(figures["stage_all_tokens_per_second"]) == timed_steps + warm_up_steps

    # No held-out documents: one epoch reads every row the manifest counts, with every masked position.
    assert figures["read_rows"] == figures["cache_rows"]
    assert figures["read_positions"] == figures["cache_masked_positions"]
    # A cache step draws one micro-batch of rows: about micro-batch x the cache's positions per row. The steps
    # draw only a few dozen rows, so allow half either way; a count per row or per token is off by far more.
    per_row = figures["cache_masked_positions"] / figures["cache_rows"]
    expected = figures["micro_batch_size"] * per_row
    assert 0.5 * expected <= figures["positions_per_step"] <= 1.5 * expected, (figures["positions_per_step"], expected)

    # One WordPiece teacher over text without punctuation: every token keeps its own canonical spelling, so the
    # merged vocabulary is the teacher's, and the stage exported a student of that size.
    assert figures["student_vocabulary"] == figures["teacher_vocabulary"] == figures["exported_student_vocabulary"]


def test_targets_benchmark_reports_every_figure(tmp_path):
    from conftest import make_documents

    for language in ("de", "ru"):
        (tmp_path / f"{language}.txt").write_text("\n".join(make_documents(language, 60, seed=3)) + "\n", "utf-8")
    figures = run_bench("targets.py", "--corpus", str(tmp_path))
    assert figures["preset"] == "tiny"
    caches, teachers = figures["caches"], figures["teachers"]

    # One masking seed and one slice: the three caches hold the same positions. Their bytes grow with what they
    # store per position: the tail's draws on top of the top-8, and every token in the dense cache.
    assert len({cache["masked_positions"] for cache in caches.values()}) == 1
    assert caches["top8_no_tail"]["bytes_per_position"] < caches["top8"]["bytes_per_position"]
    assert caches["top8"]["bytes_per_position"] < caches["dense"]["bytes_per_position"]
    # The dense cache's top_k is every distinct token of both teachers, so it holds all of their mass; a top-8
    # holds less, and less still at tau 2 (tempering flattens a distribution, moving mass out of its top).
    for teacher in teachers.values():
        assert caches["dense"]["top_k"] == teacher["distinct_tokens"] <= teacher["vocabulary"]
        assert abs(teacher["dense_mass"] - 1) < 1e-4, teacher
        mass = teacher["top8_mass"]
        assert 0 < mass["mean_topk_mass_tau2"] <= mass["mean_topk_mass"] + 1e-9 < teacher["dense_mass"], mass

    students = figures["students"]
    assert set(students) == {"untrained", "rest", "renormalize", "support", "support+tail", "dense"}
    for language in teachers:
        scored = [student["windows"][language] for student in students.values()]
        # Every student is scored on the same held-out positions of the same dense cache (one held-out rule on
        # one slice, one merged vocabulary): the teacher's side is the same figure each time.
        assert len({s["positions"] for s in scored}) == 1 and scored[0]["positions"] > 0
        assert len({s["teacher_ce"] for s in scored}) == 1 and scored[0]["teacher_ce"] > 0
        assert len({s["teacher_mask_accuracy"] for s in scored}) == 1
        for s in scored:
            assert 0 <= s["outside_mass"] <= 1 and 0 <= s["agreement"] <= 1, s
            assert s["student_ce"] > 0 and s["kl"] >= -1e-6, s
            assert 0 < s["mask_positions"] <= s["positions"] and 0 <= s["mask_accuracy"] <= 1, s
            assert isinstance(s["usable"], bool)
    seconds = figures["seconds"]
    assert positive(*seconds.values())
    assert sum(value for key, value in seconds.items() if key != "total") <= seconds["total"]


def test_train_benchmark_vocabulary_sweep_reports_step_ratio_and_loss_memory():
    figures = run_bench("train.py", "--sweep", "--vocabularies", "3000,9000", "--rows", "4", "--steps", "1")
    assert [point["vocabulary"] for point in figures["points"]] == [3000, 9000]
    for point in figures["points"]:
        assert positive(
            point["step_seconds_mlm"],
            point["step_seconds_distillation"],
            point["distillation_over_mlm"],
            point["tokens_per_second"],
            point["one_logits_bytes"],
        )
        assert point["one_logits_bytes"] == point["positions"] * point["vocabulary"] * 4
        # The chunk keeps logits_per_chunk (2^24) logits at once; never more positions than that allows.
        assert point["chunk_positions"] == max(1, 2**24 // point["vocabulary"])
        assert point["mfu"] is None  # no --peak-tflops


def test_train_benchmark_times_a_real_runs_step_against_plain_mlm(training_cache, tmp_path):
    config = train_config(train={"steps": 4, "eval_every": 2, "micro_batch_size": 4})
    path = write_config(tmp_path / "student.yaml", config)
    figures = run_bench("train.py", "--student-config", str(path), "--cache", str(training_cache), "--steps", "3")
    # --steps rounded up to whole held-out intervals: rounds of E stage steps ending in a scoring, E MLM steps.
    assert figures["eval_every"] == 2 and figures["rounds"] == 2 and figures["timed_steps"] == 4
    assert figures["micro_batch_size"] == 4 and len(figures["blocks"]) == 2
    # Every block ran the stage's steps and scorings (one untimed round first): what its metrics file recorded.
    assert figures["logged_train_steps"] == 6 and figures["logged_scorings"] == 3
    for block in figures["blocks"]:
        assert block["stage"] > block["scoring"] > 0 and block["mlm"] > 0
    ratios = sorted(block["stage"] / block["mlm"] for block in figures["blocks"])
    assert figures["step_over_mlm"] == ratios[1]  # the upper middle of two
    assert figures["step_without_scoring_over_mlm"] < figures["step_over_mlm"]
    # The plain MLM step's student is the run's: the merged vocabulary the stage itself builds for this config.
    assert train(tmp_path, training_cache, config, "reference").exit_code == 0
    tokens = (tmp_path / "reference" / "vocab" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert figures["student_vocabulary"] == len(tokens)
