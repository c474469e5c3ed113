"""Benchmark for stage one, `mdkd cache-logits`: it prints figures and is not a test (it checks only its own
set-up: that the batches it times hold the run's masked positions and give the run's log-probabilities, and it
reports whether repeated runs wrote identical shards).

It uses mdkd's public API only, and the timings the stage logs itself, so a refactoring of the stage's private
steps cannot break it or silently change what it measures. On a BERT-shaped teacher with random weights and a
generated, seeded corpus it measures:

1. End-to-end: the real stage, `mdkd.stages.cache_logits.run(config, out)`, timed as a whole. Its one-off costs
   are timed apart, outside the run, by calling the public functions the stage calls for them (`scan_source`
   for the corpus scan, `inspect_teacher` for the teacher checks, `Teacher(...)` for the model load), so
   throughput is reported with and without them. The identity hash, the folder claim and the manifest writing
   have no public entry point: they stay in the "steady" time (a tokenizer save and a few small JSON files).
   The stage's own per-unit log (CACHE/logs/cache-logits.rank0.jsonl: seconds and tokens_per_second of each
   unit's scoring and table building on its main thread) says how much of the run the unit loop took.
   Tokens are counted from the shards it wrote (sum of len(input_ids) over all rows; one masked copy per window).
2. Bare forward: the run's own batches, timing only `Teacher.top_k` calls. They are rebuilt from the cache the
   first run wrote (each shard is one unit: its rows in the order the stage scored them), cut by `length_batches`
   and padded by `padded_inputs`, the functions `score_unit` uses; no corpus re-reading or re-masking, so the
   benchmark holds no copy of the stage's unit planning. End-to-end time / bare time is the pipeline's
   overhead; the goal is <= 1.15. To say where it goes, the work the stage logs per unit (`score_unit`, then
   `build_table`) is also timed here alone, unit after unit, with no prefetch or writer thread beside it: the
   logged unit seconds over that show what sharing the machine with those threads costs inside the run.
3. Masked-only head: `masked_logits` with the architecture's adapter (encoder on the whole batch, MLM head only at
   masked positions) against `masked_logits` with no adapter (the full `*ForMaskedLM` forward, then a gather),
   same batches. Both are the public function `Teacher.top_k` calls; what follows it there (log-softmax, top-k,
   tempered log-partitions) is the same on both paths and is not timed. The largest logit and log-probability
   differences between the two paths on the first batch are reported.
4. Bytes per cached position: total shard bytes (every column, the log-partitions included) / masked positions,
   for float32 log-probabilities (what the run wrote) and float16 (the same shards with that one column cast,
   written by the stage's `write_shard`).
5. Peak RSS of the whole stage at N and 4N documents, each in a fresh process so the peaks do not mix; the
   corpus is streamed in blocks of `shard_documents`, so it should grow little.

No longer measured (each needed wrapping the stage's private functions): the time of the identity hash, the
folder claim and the manifest writing on their own, and the time spent in `Teacher.top_k` and in `build_table`
inside the run (`parts_s`, `in_run_top_k_s`); section 2 sets the stage's logged unit time against the same
work done alone instead.

A first run (reported as `cold_run_s`, not among the rounds) warms the process up and writes the cache the bare
batches come from; then timings 1-3 are interleaved in rounds (end-to-end, bare, and in the first --full-repeats
rounds the unit work alone and the two head passes; --repeats rounds) and the fastest of each counts, so a change
in machine load during the benchmark hits every figure alike; every round's figures are in the JSON.

Run it from the repository root (mdkd installed, e.g. `pip install -e .`):

    python bench/cache_logits.py --tiny                                    # smoke run, seconds
    python bench/cache_logits.py                                           # small teacher on the CPU
    python bench/cache_logits.py --preset base --device cuda --dtype bf16  # BERT-base, 120k vocabulary

Progress bars and the stage's own messages go to stderr; the figures go to stdout, and the last line of stdout
is one JSON object holding all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import yaml

# bench/common.py: `python bench/<script>.py` puts bench/ first on sys.path
from common import median, peak_rss_mb, preset_parser, print_figures, say, session

import mdkd
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import CachedRow, UnitRows, build_table, shard_schema, write_shard
from mdkd.pipeline.distributed import Ranks, pick_device
from mdkd.pipeline.teacher_pass.config import CacheConfig, load_cache_config
from mdkd.pipeline.teacher_pass.corpus import read_language, scan_source
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.teachers import (
    Teacher,
    inspect_teacher,
    masked_logits,
    pick_dtype,
)
from mdkd.pipeline.teacher_pass.windows import (
    PreparedUnit,
    length_batches,
    padded_inputs,
    plan_batches,
    score_unit,
)
from mdkd.pipeline.teacher_pass.workers import UnitBlock, UnitPreparation, default_workers, ready_units
from mdkd.stages import cache_logits as stage
from mdkd.tiny_models import build_masked_lm, train_tokenizer

OVERHEAD_GOAL = 1.15
LANGUAGE = "xx"
TEACHER = "bert"
LOG_FILE = "logs/cache-logits.rank0.jsonl"  # the stage's per-unit events (a one-process run is rank 0)

# `word_types` is the size of the generated word list the tokenizer is trained on. For `base` it exceeds the
# 120k target so that WordPiece really learns 120k tokens (~5 s): the tokenizer then has 120k entries, the
# model's vocabulary matches it, and Teacher.vocab_limit (= len(tokenizer)) spans the whole head. The head-cost
# figure is then honest (projection, log-softmax and top-k over all 120k ids, as with a multilingual BERT).
# The last four keys are the defaults of the flags of the same names.
PRESETS = {
    "tiny": {
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "vocab": 1_000,
        "word_types": 3_000,
        "documents": 48,
        "shard_documents": 16,
        "repeats": 1,
        "full_repeats": 1,
    },
    "small": {
        "hidden": 128,
        "layers": 2,
        "heads": 2,
        "vocab": 8_000,
        "word_types": 20_000,
        "documents": 512,
        "shard_documents": 128,
        "repeats": 5,
        "full_repeats": 2,
    },
    "base": {
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "vocab": 120_000,
        "word_types": 200_000,
        "documents": 4096,
        "shard_documents": 128,
        "repeats": 5,
        "full_repeats": 2,
    },
}
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "er", "or", "st"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = preset_parser("Benchmark for `mdkd cache-logits` (see the module docstring).", PRESETS)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--documents", type=int, default=None, help="corpus size N (default: the preset's)")
    parser.add_argument(
        "--shard-documents",
        type=int,
        default=None,
        help="documents per shard (default: the preset's); small enough that N documents make "
        "several shards, so the prefetch and writer threads overlap with the teacher as they "
        "do in a long run",
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timing rounds; the fastest counts (default: the preset's)",
    )
    parser.add_argument(
        "--full-repeats",
        type=int,
        default=None,
        help="rounds that also time the head passes (the full forward is the slowest pass; its "
        "lead is large; default: the preset's)",
    )
    parser.add_argument("--rss-factor", type=int, default=4, help="the second peak-RSS run uses this many x N")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument(
        "--workers-sweep",
        action="store_true",
        help="also time the host path alone and the whole stage at 0, 1, 2, 4, ... and all (the default) workers",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and print its path")
    parser.add_argument("--rss-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("documents", "shard_documents", "repeats", "full_repeats"):
        if getattr(args, name) is None:
            setattr(args, name, PRESETS[args.preset][name])
    args.repeats, args.full_repeats = max(args.repeats, 1), max(min(args.full_repeats, args.repeats), 1)
    return args


# ---------------------------------------------------------------- inputs: words, corpus, teacher, config


def make_words(count: int, seed: int) -> list[str]:
    """`count` distinct pseudo-words of 1-4 syllables: a fixed, seeded word list with no external data."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        words["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


def write_corpus(path: Path, words: list[str], documents: int, seed: int) -> None:
    """One document per line. Words follow a Zipf law (as in real text, so frequent pieces are frequent);
    lengths are log-normal (median ~60 words, a tail of long documents that need several windows)."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, len(words) + 1)))
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(documents):
            length = min(1500, max(3, int(rng.lognormvariate(math.log(60), 0.9))))
            handle.write(" ".join(rng.choices(words, cum_weights=cumulative, k=length)).capitalize() + ".\n")


def build_teacher(preset: dict, words: list[str], folder: Path) -> tuple[int, int]:
    """Train a WordPiece tokenizer on the word list and save a random BERT for it; return (vocab, parameters)."""
    lines = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    tokenizer = train_tokenizer("wordpiece", lines, preset["vocab"], folder)
    model = build_masked_lm(
        "bert", tokenizer, folder, hidden=preset["hidden"], layers=preset["layers"], heads=preset["heads"]
    )
    return len(tokenizer), sum(p.numel() for p in model.parameters())


def write_config(path: Path, corpus: Path, teacher: Path, args) -> Path:
    config = {
        "corpus": [{"language": LANGUAGE, "path": str(corpus)}],
        "teachers": [{"name": TEACHER, "model": str(teacher), "languages": [LANGUAGE]}],
        "masking": {"probability": 0.15, "seed": args.seed, "copies": 1},
        "max_length": args.max_length,
        "top_k": args.top_k,
        "tail_samples": 0,  # the top-k path and its bytes; bench/targets.py measures what the tail costs
        "batch_tokens": args.batch_tokens,
        "dtype": args.dtype,
        "device": args.device_name,
        "logprobs_dtype": "float32",
        "shard_documents": args.shard_documents,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. end-to-end run of the real stage


def run_stage(config: Path, out: Path) -> dict:
    """One whole stage run into a fresh folder: its wall-clock time, its manifest and its per-unit log."""
    started = time.perf_counter()
    manifest = stage.run(config, out)
    total = time.perf_counter() - started
    units = [json.loads(line) for line in (out / LOG_FILE).read_text(encoding="utf-8").splitlines() if line]
    return {
        "out": out,
        "manifest": manifest,
        "total_s": total,
        "units": units,
        "units_s": sum(unit["seconds"] for unit in units),
    }


def one_off_costs(config_path: Path) -> tuple[dict[str, float], Teacher]:
    """The stage's per-run costs, each timed by calling the public function the stage calls for it; also
    returns the loaded teacher (the bare passes use it, loaded exactly as the stage loads it)."""
    config = load_cache_config(config_path)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for source in config.corpus:
        scan_source(source)  # the stage reads every source once to count and fingerprint it
    seconds["corpus_scan"] = time.perf_counter() - started
    started = time.perf_counter()
    info, problems = inspect_teacher(config.teachers[0], config.top_k, config.max_length)
    assert info is not None and not problems, problems
    seconds["teacher_checks"] = time.perf_counter() - started
    started = time.perf_counter()
    device = pick_device(config.device, Ranks.from_env())
    teacher = Teacher(info, device, pick_dtype(config.dtype, device))
    seconds["model_load"] = time.perf_counter() - started
    return seconds, teacher


def shard_counts(cache: CacheReader) -> dict:
    """Tokens read from the shards themselves; rows, masked positions and bytes from the manifest."""
    manifest = cache.manifest
    tokens = sum(len(cache.rows(shard).input_ids) for shard in manifest.shards)
    return {
        "tokens": tokens,
        "rows": manifest.totals.rows,
        "masked_positions": manifest.totals.masked_positions,
        "bytes": manifest.totals.bytes,
        "shards": len(manifest.shards),
    }


# ---------------------------------------------------------------- 2-3. bare teacher forward on the same batches


def cached_unit(cache: CacheReader, shard) -> PreparedUnit:
    """A unit as the stage had it before scoring, read back from its shard (rows in the stage's order)."""
    table = cache.table(shard)
    decoded = cache.rows(shard)
    names = zip(*(table.column(name).to_pylist() for name in ("doc_id", "window", "copy")), strict=False)
    rows = []
    for index, (doc_id, window, copy) in enumerate(names):
        cached = decoded.row(index)
        rows.append(CachedRow(doc_id, window, copy, cached.input_ids, cached.positions, cached.labels))
    return PreparedUnit(UnitRows.from_rows(rows), windows_without_tokens=0, tokens=len(decoded.input_ids))


def forward_batches(units: list[PreparedUnit], config: CacheConfig, pad_id: int) -> list[tuple]:
    """The padded batches `score_unit` feeds the teacher, unit by unit."""
    batches = []
    for unit in units:
        for batch in length_batches([len(r.input_ids) for r in unit.rows], config.batch_tokens, config.batch_size):
            batches.append(padded_inputs([unit.rows[i] for i in batch], pad_id))
    return batches


def score_as_configured(teacher: Teacher, unit: PreparedUnit, config: CacheConfig):
    """score_unit with the stage's settings from `config`, on the batches the stage's workers plan for the unit."""
    batches = plan_batches(unit.rows, teacher.pad_id, config.batch_tokens, config.batch_size)
    return score_unit(
        teacher,
        [batch.tensors(pin=False) for batch in batches],
        int(unit.rows.position_offsets[-1]),
        k=config.top_k,
        temperatures=config.temperatures,
    )


def difference_from_cache(teacher: Teacher, cache: CacheReader, unit: PreparedUnit, config: CacheConfig) -> float:
    """Largest |log-prob| difference between `score_unit` now and what the run cached for the same unit: a check
    that the rebuilt rows are the run's and the teacher is loaded as the stage loads it (0 on a CPU)."""
    predictions = score_as_configured(teacher, unit, config)
    return float(np.abs(predictions.topk_logprobs - cache.rows(cache.manifest.shards[0]).topk_logprobs).max())


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_pass(teacher: Teacher, batches: list[tuple], config: CacheConfig) -> float:
    """Seconds spent in teacher.top_k over all batches, nothing else (it returns CPU tensors: synchronised). It
    computes what the stage caches: the top-k and the tempered log-partitions at every cached temperature."""
    started = time.perf_counter()
    for batch in batches:
        teacher.top_k(*batch, k=config.top_k, temperatures=config.temperatures)
    return time.perf_counter() - started


def unit_work_pass(teacher: Teacher, units: list[tuple[str, PreparedUnit]], config: CacheConfig) -> dict:
    """Seconds of the work the stage logs per unit (score_unit, then build_table), done here unit after unit with
    no prefetch or writer thread beside it: set against the logged seconds, it shows what sharing the machine
    with those threads costs inside the run."""
    seconds = {"score_unit": 0.0, "build_table": 0.0}
    for language, unit in units:
        started = time.perf_counter()
        predictions = score_as_configured(teacher, unit, config)
        scored = time.perf_counter()
        build_table(unit.rows, language, predictions, config.logprobs_dtype)
        seconds["score_unit"] += scored - started
        seconds["build_table"] += time.perf_counter() - scored
    return {**seconds, "total": seconds["score_unit"] + seconds["build_table"]}


@torch.inference_mode()
def head_pass(teacher: Teacher, batches: list[tuple], masked_only: bool) -> float:
    """Seconds of masked_logits over all batches: adapter (masked-only head) or None (full forward)."""
    adapter = teacher.adapter if masked_only else None
    started = time.perf_counter()
    for batch in batches:
        masked_logits(teacher.model, adapter, *batch, teacher.device)
    synchronise(teacher.device)
    return time.perf_counter() - started


@torch.inference_mode()
def head_difference(teacher: Teacher, batch: tuple) -> dict[str, float]:
    """Both head paths must give the same logits (the adapter's contract), and so the same log-probabilities over
    the tokenizer's ids, as `Teacher.top_k` normalises them: a sanity check, reported."""
    masked = masked_logits(teacher.model, teacher.adapter, *batch, teacher.device).float()
    full = masked_logits(teacher.model, None, *batch, teacher.device).float()
    logprobs = [torch.log_softmax(logits[:, : teacher.vocab_limit], dim=-1) for logits in (masked, full)]
    return {
        "logit": float((masked - full).abs().max()),
        "logprob": float((logprobs[0] - logprobs[1]).abs().max()),
    }


def warm_up(teacher: Teacher, batches: list[tuple], config: CacheConfig) -> None:
    """One call per path before timing, so start-up costs (CUDA context, kernel selection, allocator growth) are
    not counted in the bare figures."""
    bare_pass(teacher, batches[:1], config)
    for masked_only in (True, False):
        head_pass(teacher, batches[:1], masked_only)


# ---------------------------------------------------------------- 4. bytes per cached position


def float16_bytes(cache: CacheReader, scratch: Path) -> int:
    """Shard bytes had the run stored float16 log-probabilities: each shard's table with that one column cast to
    the stage's float16 shard type, written by the stage's own writer and settings. Cheaper than a second teacher
    pass, and the same bytes up to float rounding; any other column the shards hold is kept as it is."""
    half_type = shard_schema("float16").field("topk_logprobs").type
    total = 0
    for shard in cache.manifest.shards:
        table = cache.table(shard)
        column = table.schema.get_field_index("topk_logprobs")
        half = table.set_column(column, "topk_logprobs", pc.cast(table.column(column), half_type))
        total += write_shard(scratch, shard.path, half).bytes
    return total


# ---------------------------------------------------------------- 5. peak RSS in a fresh process


def rss_child(config: str, out: str) -> None:
    """Entry point of the subprocess: run the stage once and report this process's peak RSS."""
    before = peak_rss_mb()
    with contextlib.redirect_stdout(sys.stderr):  # the stage's summary line must not end the child's stdout
        stage.run(Path(config), Path(out))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print_figures({"rss_after_imports_mb": before, "peak_rss_mb": peak_rss_mb(), "peak_gpu_allocated_mb": gpu})


def peak_rss(config: Path, out: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(config), str(out)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak-RSS run failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the benchmark and its report


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    preset = PRESETS[args.preset]
    args.device_name = resolve_device(args.device)
    with session("mdkd-bench-", keep=args.keep) as scratch:
        figures = benchmark(args, preset, scratch)
    print_figures(figures)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no GPU here (use --device cpu)")
    return requested


def benchmark(args, preset: dict, scratch: Path) -> dict:
    figures = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(torch.device(args.device_name)),
        "mdkd": str(Path(mdkd.__file__).parent),
    }
    say(f"mdkd measured: {figures['mdkd']}")
    words = make_words(preset["word_types"], args.seed)
    figures["setup"] = setup_section(args, preset, words, scratch)
    timings = timing_sections(scratch / "cache.yaml", scratch, args)
    cache = timings.pop("cache")
    figures.update(timings)
    figures["bytes_per_position"] = bytes_section(cache, scratch, figures["end_to_end"]["counts"])
    if args.workers_sweep:
        figures["workers_sweep"] = workers_section(scratch, args)
    if not args.skip_rss:
        figures["peak_rss"] = rss_section(scratch, words, args)
    return figures


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    result = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    say(
        f"machine: {cpu}, {result['cpu_count']} CPUs, torch {result['torch']} with {result['torch_threads']} "
        f"threads, GPU: {result['gpu'] or 'none'}"
    )
    return result


def setup_section(args, preset: dict, words: list[str], scratch: Path) -> dict:
    started = time.perf_counter()
    vocab, parameters = build_teacher(preset, words, scratch / "teacher")
    write_corpus(scratch / "corpus.txt", words, args.documents, args.seed)
    config = load_cache_config(write_config(scratch / "cache.yaml", scratch / "corpus.txt", scratch / "teacher", args))
    result = {
        "preset": args.preset,
        "hidden": preset["hidden"],
        "layers": preset["layers"],
        "heads": preset["heads"],
        "vocab": vocab,
        "parameters": parameters,
        "documents": args.documents,
        "shard_documents": args.shard_documents,
        "max_length": args.max_length,
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "device": args.device_name,
        "dtype": args.dtype,
        "temperatures": config.temperatures,  # the stage's default
        "masking": {"probability": config.masking.probability, "copies": config.masking.copies},
        "repeats": args.repeats,
        "full_repeats": args.full_repeats,
        "seconds": time.perf_counter() - started,
    }
    say(
        f"teacher: random BERT ({args.preset}), hidden {preset['hidden']}, {preset['layers']} layers, "
        f"{preset['heads']} heads, vocab {vocab:,}, {parameters / 1e6:.1f}M parameters; device {args.device_name}, "
        f"dtype {args.dtype} (built in {result['seconds']:.1f} s, not counted below)"
    )
    say(
        f"corpus: {args.documents} generated documents in shards of {args.shard_documents}; max_length "
        f"{args.max_length}, top_k {args.top_k}, log-partitions at tau {result['temperatures']}, batch_tokens "
        f"{args.batch_tokens}; fastest of {args.repeats} "
        f"interleaved rounds ({args.full_repeats} for the head passes)"
    )
    return result


def timing_sections(config_path: Path, scratch: Path, args) -> dict:
    """Sections 1-3. A first run warms up and writes the cache the bare batches are rebuilt from; then the rounds."""
    cold = run_stage(config_path, scratch / "cache-cold")
    one_offs, teacher = one_off_costs(config_path)
    config, cache = load_cache_config(config_path), CacheReader(cold["out"])
    units = [(shard.language, cached_unit(cache, shard)) for shard in cache.manifest.shards]
    batches = forward_batches([unit for _, unit in units], config, teacher.pad_id)
    assert sum(len(rows) for *_, rows, _ in batches) == cache.manifest.totals.masked_positions, "not the run's batches"
    assert teacher.adapter is not None, "the benchmark teacher should have a masked-only head adapter"
    difference = difference_from_cache(teacher, cache, units[0][1], config)
    warm_up(teacher, batches, config)
    rounds = timed_rounds(config_path, scratch, teacher, units, batches, config, args)
    counts = shard_counts(cache)
    identical = len({tuple(s.sha256 for s in run["manifest"].shards) for run in [cold, *rounds["runs"]]}) == 1
    end_to_end = end_to_end_section(cold, rounds["runs"], one_offs, counts, identical)
    return {
        "cache": cache,
        "end_to_end": end_to_end,
        "bare_forward": bare_section(end_to_end, rounds, len(batches), difference),
        "head": head_section(rounds["masked"], rounds["full"], head_difference(teacher, batches[0])),
    }


def timed_rounds(
    config_path: Path, scratch: Path, teacher: Teacher, units: list, batches: list, config: CacheConfig, args
) -> dict[str, list]:
    """Each round runs the stage into a fresh folder, then the bare pass; the first --full-repeats rounds also
    time the stage's unit work alone and the two head passes."""
    rounds: dict[str, list] = {"runs": [], "bare": [], "unit_work": [], "masked": [], "full": []}
    for round_ in range(args.repeats):
        rounds["runs"].append(run_stage(config_path, scratch / f"cache-{round_}"))
        rounds["bare"].append(bare_pass(teacher, batches, config))
        if round_ < args.full_repeats:
            rounds["unit_work"].append(unit_work_pass(teacher, units, config))
            rounds["masked"].append(head_pass(teacher, batches, masked_only=True))
            rounds["full"].append(head_pass(teacher, batches, masked_only=False))
    return rounds


def end_to_end_section(cold: dict, runs: list[dict], one_offs: dict, counts: dict, identical: bool) -> dict:
    best = min(runs, key=lambda run: run["total_s"])
    one_off = sum(one_offs.values())
    steady = best["total_s"] - one_off
    # The stage logs each unit's tokens_per_second (its scoring and table building, main thread only).
    result = {
        "total_s": best["total_s"],
        "one_off_s": one_off,
        "steady_s": steady,
        "all_total_s": [run["total_s"] for run in runs],
        "cold_run_s": cold["total_s"],
        "one_offs_s": one_offs,
        "units_s": best["units_s"],
        "units": len(best["units"]),
        "logged_unit_tokens_per_s_median": median([unit["tokens_per_second"] for unit in best["units"]]),
        "counts": counts,
        "tokens_per_s": counts["tokens"] / best["total_s"],
        "tokens_per_s_without_one_offs": counts["tokens"] / steady,
        "tokens_per_s_in_units": counts["tokens"] / best["units_s"],
        "shards_identical_across_rounds": identical,
    }
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.2f}" for name, seconds in one_offs.items())
    say(
        f"[1] end-to-end stage run(): {best['total_s']:.2f} s (rounds: {_seconds(result['all_total_s'])}; first, "
        f"cold run {cold['total_s']:.2f} s), of which one-off {one_off:.2f} s ({parts}; timed apart)"
    )
    say(
        f"    {counts['tokens']:,} tokens (counted in the shards) in {counts['rows']:,} rows, "
        f"{counts['masked_positions']:,} masked positions, {counts['shards']} shards; shards byte-identical "
        f"across rounds: {'yes' if identical else 'NO'}"
    )
    say(
        f"    throughput: {result['tokens_per_s']:,.0f} tokens/s with one-offs, "
        f"{result['tokens_per_s_without_one_offs']:,.0f} tokens/s without; the stage's log: {len(best['units'])} "
        f"units in {best['units_s']:.2f} s ({result['tokens_per_s_in_units']:,.0f} tokens/s, median unit "
        f"{result['logged_unit_tokens_per_s_median']:,.0f})"
    )
    return result


def bare_section(end_to_end: dict, rounds: dict, batches: int, difference: float) -> dict:
    bare_s = rounds["bare"]
    bare = min(bare_s)
    one_off = end_to_end["one_off_s"]
    # The same ratio within each round (its two timings minutes apart at most): the spread shows machine noise.
    per_round = [(run["total_s"] - one_off) / seconds for run, seconds in zip(rounds["runs"], bare_s, strict=False)]
    unit_work = min(rounds["unit_work"], key=lambda work: work["total"])
    result = {
        "seconds": bare,
        "all_s": bare_s,
        "batches": batches,
        "model_load_s": end_to_end["one_offs_s"]["model_load"],
        "tokens_per_s": end_to_end["counts"]["tokens"] / bare,
        "overhead_ratio_with_one_offs": end_to_end["total_s"] / bare,
        "overhead_ratio_without_one_offs": end_to_end["steady_s"] / bare,
        "goal": OVERHEAD_GOAL,
        "overhead_ratio_without_one_offs_per_round": per_round,
        "unit_work_alone_s": unit_work,
        "all_unit_work_alone_s": [work["total"] for work in rounds["unit_work"]],
        "unit_work_alone_over_bare": unit_work["total"] / bare,
        "logged_units_over_bare": end_to_end["units_s"] / bare,
        "logged_units_over_unit_work_alone": end_to_end["units_s"] / unit_work["total"],
        "max_abs_logprob_difference_vs_cache": difference,
    }
    say(
        f"[2] bare teacher.top_k over the same {batches} batches: {bare:.2f} s (rounds: {_seconds(bare_s)}; "
        f"warmed up) = {result['tokens_per_s']:,.0f} tokens/s; largest |log-prob difference| from the cache "
        f"{difference:.1e}"
    )
    say(
        f"    overhead, end-to-end / bare: {result['overhead_ratio_with_one_offs']:.2f} with one-offs, "
        f"{result['overhead_ratio_without_one_offs']:.2f} without (goal <= {OVERHEAD_GOAL}); round by round, "
        f"without one-offs: {_seconds(per_round)}"
    )
    other = end_to_end["steady_s"] - end_to_end["units_s"]
    say(
        f"    where the steady run's {end_to_end['steady_s']:.2f} s went: logged unit work "
        f"{end_to_end['units_s']:.2f} s ({result['logged_units_over_bare']:.2f} x bare), other {other:.2f} s "
        "(first unit's tokenising and masking, last shard's write, thread hand-offs, identity and manifest)"
    )
    say(
        f"    the same unit work alone, no threads beside it: score_unit {unit_work['score_unit']:.2f} s + build_table "
        f"{unit_work['build_table']:.2f} s ({result['unit_work_alone_over_bare']:.2f} x bare); inside the run it "
        f"took {result['logged_units_over_unit_work_alone']:.2f} x that"
    )
    return result


def head_section(masked_s: list[float], full_s: list[float], difference: dict[str, float]) -> dict:
    per_round = [
        full / masked for full, masked in zip(full_s, masked_s, strict=False)
    ]  # back-to-back passes in one round
    result = {
        "masked_only_s": min(masked_s),
        "full_forward_s": min(full_s),
        "all_masked_only_s": masked_s,
        "all_full_forward_s": full_s,
        "full_over_masked": min(full_s) / min(masked_s),
        "full_over_masked_per_round": per_round,
        "max_abs_logit_difference": difference["logit"],
        "max_abs_logprob_difference": difference["logprob"],
    }
    say(
        f"[3] head (masked_logits): masked-only {result['masked_only_s']:.2f} s, full forward "
        f"{result['full_forward_s']:.2f} s (rounds: {_seconds(full_s)}); full / masked-only = "
        f"{result['full_over_masked']:.2f} (round by round: {_seconds(per_round)}), i.e. the masked-only head saves "
        f"{1 - 1 / result['full_over_masked']:.0%}; largest difference between the two: |logit| "
        f"{difference['logit']:.1e}, |log-prob| {difference['logprob']:.1e}"
    )
    return result


def bytes_section(cache: CacheReader, scratch: Path, counts: dict) -> dict:
    positions = counts["masked_positions"]
    half = float16_bytes(cache, scratch / "cache-float16")
    result = {
        "float32": counts["bytes"] / positions,
        "float16": half / positions,
        "float32_total_bytes": counts["bytes"],
        "float16_total_bytes": half,
        "masked_positions": positions,
    }
    say(
        f"[4] bytes per cached position: float32 {result['float32']:.1f} B, float16 {result['float16']:.1f} B "
        f"(all shard bytes, every column included, / {positions:,} masked positions)"
    )
    return result


def rss_section(scratch: Path, words: list[str], args) -> dict:
    """Peak RSS at N documents (the corpus already made) and at rss_factor x N (a new one), fresh process each."""
    big = args.documents * args.rss_factor
    write_corpus(scratch / "corpus-big.txt", words, big, args.seed + 1)
    runs = {}
    for documents, corpus in ((args.documents, scratch / "corpus.txt"), (big, scratch / "corpus-big.txt")):
        config = write_config(scratch / f"cache-{documents}.yaml", corpus, scratch / "teacher", args)
        runs[str(documents)] = peak_rss(config, scratch / f"rss-{documents}")
    small, large = runs[str(args.documents)], runs[str(big)]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    say(
        f"[5] peak RSS of the whole stage (fresh process each): {args.documents} documents "
        f"{small['peak_rss_mb']:.0f} MB, {big} documents {large['peak_rss_mb']:.0f} MB ({growth:+.0%}); "
        f"imports alone {small['rss_after_imports_mb']:.0f} MB"
    )
    if small["peak_gpu_allocated_mb"] is not None:
        say(
            f"    peak GPU memory allocated by torch: {small['peak_gpu_allocated_mb']:.0f} MB and "
            f"{large['peak_gpu_allocated_mb']:.0f} MB"
        )
    say(f"    cold processes, start-up and imports included: {small['seconds']:.1f} s and {large['seconds']:.1f} s")
    return {"runs": runs, "growth": growth}


def host_path_pass(config: CacheConfig, workers: int) -> tuple[float, int]:
    """Seconds and tokens of the stage's host path alone over the corpus, at `workers` workers: reading,
    tokenising, masking and padding every unit (`ready_units`, as the stage calls it), no teacher."""
    info, problems = inspect_teacher(config.teachers[0], config.top_k, config.max_length)
    assert info is not None and not problems, problems
    tokenizer = info.tokenizer
    masker = Masker(config.masking, tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    preparation = UnitPreparation(
        tokenizer,
        masker,
        config.max_length,
        config.masking.copies,
        tokenizer.pad_token_id or 0,
        config.batch_tokens,
        config.batch_size,
        None,
    )

    def blocks():
        documents = read_language(config.sources_for(LANGUAGE))
        for part in itertools.count():
            block = list(itertools.islice(documents, config.shard_documents))
            if not block:
                return
            yield UnitBlock(LANGUAGE, part, block)

    started = time.perf_counter()
    tokens = sum(ready.unit.tokens for ready in ready_units(preparation, blocks(), workers, pin=False))
    return time.perf_counter() - started, tokens


def workers_section(scratch: Path, args) -> dict:
    """Host-path throughput (the host path alone) and the whole stage's, each the fastest of --repeats, at 0, 1,
    2, 4, ... workers and at the default (the cores less one); scaling is throughput over one worker's, per
    worker."""
    default = default_workers()
    counts = sorted({0, 1, default, *(2**i for i in range(1, 8) if 2**i < default)})
    config_path = scratch / "cache.yaml"
    config = load_cache_config(config_path)
    result = {"default_workers": default, "counts": counts, "host_path": {}, "stage": {}}
    for workers in counts:
        passes = [host_path_pass(config, workers) for _ in range(args.repeats)]
        seconds, tokens = min(passes)
        swept = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        swept_path = scratch / f"cache-workers-{workers}.yaml"
        swept_path.write_text(yaml.safe_dump({**swept, "workers": workers}, sort_keys=False), encoding="utf-8")
        runs = [run_stage(swept_path, scratch / f"cache-workers-{workers}-{i}") for i in range(args.repeats)]
        stage_s = min(run["total_s"] for run in runs)
        result["host_path"][str(workers)] = {"seconds": seconds, "tokens_per_s": tokens / seconds}
        result["stage"][str(workers)] = {"seconds": stage_s, "tokens_per_s": tokens / stage_s}
    one = result["host_path"]["1"]["tokens_per_s"]
    for workers in counts:
        if workers:
            figures = result["host_path"][str(workers)]
            figures["scaling_per_worker"] = figures["tokens_per_s"] / one / workers
    say(
        "[6] host path alone (read, tokenise, mask, pad; no teacher) and whole stage, by workers: "
        + "; ".join(
            f"{w}: {result['host_path'][str(w)]['tokens_per_s']:,.0f} / {result['stage'][str(w)]['tokens_per_s']:,.0f}"
            " tokens/s" + (f" (x{result['host_path'][str(w)]['scaling_per_worker']:.2f} per worker)" if w else "")
            for w in counts
        )
        + f"; default {default}"
    )
    return result


def _seconds(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    main()
