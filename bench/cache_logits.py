"""Benchmark for stage one, `mdkd cache-logits`: it prints figures and is not a test (it checks only its own
set-up: that its rebuilt batches are the run's, and it reports whether repeated runs wrote identical shards).

What it measures, on a BERT-shaped teacher with random weights and a generated, seeded corpus:

1. End-to-end: the real stage, `mdkd.stages.cache_logits.run(config, out)`, timed as a whole and with its
   one-off costs (corpus scan and fingerprint, teacher checks, model load, manifest writing) timed apart, so
   throughput is reported both with and without them. Tokens are counted from the shards it wrote
   (sum of len(input_ids) over all rows; one masked copy per window).
2. Bare forward: the same batches rebuilt with the pipeline's own functions (Masker, prepare_unit,
   length_batches, collate), timing only `Teacher.top_k` calls. End-to-end time / bare time is the
   pipeline's overhead; the goal is <= 1.15.
3. Masked-only head: `Teacher.top_k` with the architecture adapter (encoder on the whole batch, MLM head only
   at masked positions) against the full `*ForMaskedLM` forward (adapter set to None), same batches.
4. Bytes per cached position: total shard bytes / masked positions, for float32 log-probabilities (what the
   run wrote) and float16 (the same shards rewritten with the stage's own shard writer).
5. Peak RSS of the whole stage at N and 4N documents, each in a fresh process so the peaks do not mix; the
   corpus is streamed in blocks of `shard_documents`, so it should grow little.

Timings 1-3 are interleaved in rounds (end-to-end, masked-only, and in the first --full-repeats rounds the full
forward; --repeats rounds) and the fastest of each counts, so a change in machine load during the benchmark
hits every figure alike; every round's figures are in the JSON.

Run it from the repository root:

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
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

import mdkd
from mdkd.pipeline.teacher_pass.config import load_cache_config
from mdkd.pipeline.teacher_pass.corpus import read_language
from mdkd.pipeline.distributed import Ranks, pick_device
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.cache.shards import read_shard, write_shard
from mdkd.pipeline.teacher_pass.teachers import Teacher, pick_dtype
from mdkd.demo.tiny_models import build_masked_lm, train_tokenizer
from mdkd.pipeline.teacher_pass.windows import collate, length_batches, prepare_unit
from mdkd.stages import cache_logits as stage

OVERHEAD_GOAL = 1.15
LANGUAGE = "xx"

# `word_types` is the size of the generated word list the tokenizer is trained on. For `base` it exceeds the
# 120k target so that WordPiece really learns 120k tokens (~5 s): the tokenizer then has 120k entries, the
# model's vocabulary matches it, and Teacher.vocab_limit (= len(tokenizer)) spans the whole head. The head-cost
# figure is then honest (projection, log-softmax and top-k over all 120k ids, as with a multilingual BERT)
# without patching vocab_limit behind the stage's back, which a model padded past a small tokenizer would need.
PRESETS = {
    "small": dict(hidden=128, layers=2, heads=2, vocab=8_000, word_types=20_000, documents=512),
    "base": dict(hidden=768, layers=12, heads=12, vocab=120_000, word_types=200_000, documents=4096),
}
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "er", "or", "st"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark for `mdkd cache-logits` (see the module docstring).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--documents", type=int, default=None, help="corpus size N (default: the preset's)")
    parser.add_argument("--shard-documents", type=int, default=128,
                        help="documents per shard; small enough that N documents make several shards, so the "
                             "prefetch and writer threads overlap with the teacher as they do in a long run")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds; the fastest counts")
    parser.add_argument("--full-repeats", type=int, default=2,
                        help="rounds that also time the full forward (the slowest pass; its lead is large)")
    parser.add_argument("--rss-factor", type=int, default=4, help="the second peak-RSS run uses this many x N")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and print its path")
    parser.add_argument("--rss-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
    model = build_masked_lm("bert", tokenizer, folder, hidden=preset["hidden"], layers=preset["layers"],
                            heads=preset["heads"])
    return len(tokenizer), sum(p.numel() for p in model.parameters())


def write_config(path: Path, corpus: Path, teacher: Path, args) -> Path:
    config = {
        "corpus": [{"language": LANGUAGE, "path": str(corpus)}],
        "teachers": [{"name": "bert", "model": str(teacher), "languages": [LANGUAGE]}],
        "masking": {"probability": 0.15, "seed": args.seed, "copies": 1},
        "max_length": args.max_length,
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "dtype": args.dtype,
        "device": args.device_name,
        "logprobs_dtype": "float32",
        "shard_documents": args.shard_documents,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. end-to-end run of the real stage

# Stage steps paid once per run whatever the corpus's teacher work ('Teacher' is the model load; the corpus
# scan reads the corpus once, but it is I/O and hashing, not teacher work).
ONE_OFFS = ("_scan_corpus", "_inspect_teachers", "_identity", "_check_out_dir", "_claim_out_dir", "Teacher",
            "_finish_manifest")
# Per-unit steps on the stage's main thread, timed to show where the time beyond the forward goes.
PER_UNIT = ("score_unit", "build_table")


@contextlib.contextmanager
def instrumented_stage(seconds: dict[str, float]):
    """Time stage steps and the run's teacher.top_k calls by wrapping module attributes (never editing the
    stage); the originals are put back on exit."""
    originals = {name: getattr(stage, name) for name in ONE_OFFS + PER_UNIT}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def timed_teacher(*args, **kwargs):
        teacher = timed("Teacher", originals["Teacher"])(*args, **kwargs)
        teacher.top_k = timed("top_k", teacher.top_k)  # an instance attribute: this run's teacher only
        return teacher

    for name, function in originals.items():
        setattr(stage, name, timed_teacher if name == "Teacher" else timed(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(stage, name, function)


def run_stage(config: Path, out: Path) -> dict:
    seconds: dict[str, float] = {}
    with instrumented_stage(seconds), contextlib.redirect_stdout(sys.stderr):
        started = time.perf_counter()
        manifest = stage.run(config, out)
        total = time.perf_counter() - started
    one_off = sum(seconds.get(name, 0.0) for name in ONE_OFFS)
    return {"manifest": manifest, "total_s": total, "one_off_s": one_off, "steady_s": total - one_off,
            "parts_s": {name: seconds.get(name, 0.0) for name in ONE_OFFS + PER_UNIT + ("top_k",)}}


def shard_counts(out: Path, manifest: dict) -> dict:
    """Tokens read from the shards themselves; rows, masked positions and bytes from the manifest."""
    tokens = 0
    for shard in manifest["shards"]:
        lengths = pc.list_value_length(read_shard(out / shard["path"], ["input_ids"]).column("input_ids"))
        tokens += int(pc.sum(lengths).as_py() or 0)
    totals = manifest["totals"]
    return {"tokens": tokens, "rows": totals["rows"], "masked_positions": totals["masked_positions"],
            "bytes": totals["bytes"], "shards": len(manifest["shards"])}


# ---------------------------------------------------------------- 2-3. bare teacher forward on the same batches


def load_teacher(config_path: Path) -> tuple[Teacher, object, float]:
    """The stage's teacher, loaded the way the stage loads it; return it, its tokenizer and the load time."""
    config = load_cache_config(config_path)
    info = stage._inspect_teachers(config)[config.teachers[0].name]  # the stage's own checks, same arguments
    started = time.perf_counter()
    device = pick_device(config.device, Ranks.from_env())
    teacher = Teacher(info, device, pick_dtype(config.dtype, device))
    return teacher, info.tokenizer, time.perf_counter() - started


def rebuild_batches(config_path: Path, teacher: Teacher, tokenizer) -> list[tuple]:
    """Exactly the stage's batches: same blocks, masking, windows, length buckets and padding."""
    config = load_cache_config(config_path)
    masker = Masker(config.masking, tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    documents = read_language(config.sources_for(LANGUAGE))
    batches = []
    while block := list(itertools.islice(documents, config.shard_documents)):
        examples = prepare_unit(block, tokenizer, masker, config.max_length, config.masking.copies).examples
        lengths = [len(e.masked.input_ids) for e in examples]
        for batch in length_batches(lengths, config.batch_tokens, config.batch_size):
            batches.append(collate([examples[i] for i in batch], teacher.pad_id))
    return batches


def forward_pass(teacher: Teacher, batches: list[tuple], k: int, masked_only: bool) -> tuple[float, list]:
    """Seconds spent in teacher.top_k over all batches (nothing else timed) and its outputs. masked_only=False
    sets the adapter to None, which makes Teacher.top_k take its full-forward fallback."""
    adapter = teacher.adapter
    teacher.adapter = adapter if masked_only else None
    try:
        started = time.perf_counter()
        outputs = [teacher.top_k(*batch, k=k) for batch in batches]  # top_k returns CPU tensors: synchronised
        return time.perf_counter() - started, outputs
    finally:
        teacher.adapter = adapter


def warm_up(teacher: Teacher, batches: list[tuple], k: int) -> None:
    """One call per path before timing, so process start-up costs (CUDA context, kernel selection, allocator
    growth) are not counted in the bare figures. They are then warm for the end-to-end rounds too: 'with
    one-offs' means the stage's own one-offs; the cold process is timed in the peak-RSS runs."""
    for masked_only in (True, False):
        forward_pass(teacher, batches[:1], k, masked_only)


def largest_difference(masked: list, full: list) -> float:
    """Both paths must give the same log-probabilities (the adapter's contract): a sanity check, reported."""
    return max(float((a[0] - b[0]).abs().max()) for a, b in zip(masked, full))


# ---------------------------------------------------------------- 4. bytes per cached position


def float16_bytes(out: Path, manifest: dict, scratch: Path) -> int:
    """Shard bytes had the run stored float16 log-probabilities: each shard's table with that one column cast
    (as build_table does for logprobs_dtype float16), written by the stage's own writer and settings.
    Cheaper than a second teacher pass, and the same bytes up to float rounding."""
    total = 0
    for shard in manifest["shards"]:
        table = read_shard(out / shard["path"])
        column = table.schema.get_field_index("topk_logprobs")
        half = pc.cast(table.column(column), pa.list_(pa.list_(pa.float16())))
        total += write_shard(scratch, shard["path"], table.set_column(column, "topk_logprobs", half)).bytes
    return total


# ---------------------------------------------------------------- 5. peak RSS in a fresh process


def rss_child(config: str, out: str) -> None:
    """Entry point of the subprocess: run the stage once and report this process's peak RSS."""
    before = max_rss_mb()
    with contextlib.redirect_stdout(sys.stderr):
        stage.run(Path(config), Path(out))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"rss_after_imports_mb": before, "peak_rss_mb": max_rss_mb(), "peak_gpu_allocated_mb": gpu}))


def max_rss_mb() -> float:
    """This process's peak resident set size in MB.

    VmHWM first: ru_maxrss survives fork and exec on Linux, so a child started from this (already large)
    benchmark process would report the parent's peak; VmHWM belongs to the address space exec creates.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def peak_rss(config: Path, out: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--rss-child", str(config), str(out)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"peak-RSS run failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the benchmark and its report


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    preset = PRESETS[args.preset]
    args.documents = args.documents or preset["documents"]
    args.device_name = resolve_device(args.device)
    scratch = Path(tempfile.mkdtemp(prefix="mdkd-bench-"))
    try:
        figures = benchmark(args, preset, scratch)
    finally:
        if args.keep:
            say(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(figures))


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no GPU here (use --device cpu)")
    return requested


def say(line: str) -> None:
    print(line, flush=True)


def benchmark(args, preset: dict, scratch: Path) -> dict:
    figures = {"command": " ".join(["python", *sys.argv]), "machine": machine(torch.device(args.device_name)),
               "mdkd": str(Path(mdkd.__file__).parent)}
    say(f"mdkd measured: {figures['mdkd']}")
    words = make_words(preset["word_types"], args.seed)
    figures["setup"] = setup_section(args, preset, words, scratch)
    config = scratch / "cache.yaml"
    figures.update(timing_sections(config, scratch, args))
    figures["bytes_per_position"] = bytes_section(scratch, figures.pop("manifest"), figures["end_to_end"]["counts"])
    if not args.skip_rss:
        figures["peak_rss"] = rss_section(scratch, words, args)
    return figures


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    result = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "python": platform.python_version()}
    say(f"machine: {cpu}, {result['cpu_count']} CPUs, torch {result['torch']} with {result['torch_threads']} "
        f"threads, GPU: {result['gpu'] or 'none'}")
    return result


def setup_section(args, preset: dict, words: list[str], scratch: Path) -> dict:
    started = time.perf_counter()
    vocab, parameters = build_teacher(preset, words, scratch / "teacher")
    write_corpus(scratch / "corpus.txt", words, args.documents, args.seed)
    write_config(scratch / "cache.yaml", scratch / "corpus.txt", scratch / "teacher", args)
    result = {"preset": args.preset, "hidden": preset["hidden"], "layers": preset["layers"],
              "heads": preset["heads"], "vocab": vocab, "parameters": parameters, "documents": args.documents,
              "shard_documents": args.shard_documents, "max_length": args.max_length, "top_k": args.top_k,
              "batch_tokens": args.batch_tokens, "device": args.device_name, "dtype": args.dtype,
              "repeats": args.repeats, "full_repeats": args.full_repeats, "seconds": time.perf_counter() - started}
    say(f"teacher: random BERT ({args.preset}), hidden {preset['hidden']}, {preset['layers']} layers, "
        f"{preset['heads']} heads, vocab {vocab:,}, {parameters / 1e6:.1f}M parameters; device {args.device_name}, "
        f"dtype {args.dtype} (built in {result['seconds']:.1f} s, not counted below)")
    say(f"corpus: {args.documents} generated documents in shards of {args.shard_documents}; max_length "
        f"{args.max_length}, top_k {args.top_k}, batch_tokens {args.batch_tokens}; fastest of {args.repeats} "
        f"interleaved rounds ({args.full_repeats} for the full forward)")
    return result


def timing_sections(config: Path, scratch: Path, args) -> dict:
    """Sections 1-3. Each round runs the stage into a fresh folder, then the bare masked-only and full passes."""
    teacher, tokenizer, load_s = load_teacher(config)
    assert teacher.adapter is not None, "the benchmark teacher should have a masked-only head adapter"
    batches = rebuild_batches(config, teacher, tokenizer)
    warm_up(teacher, batches, args.top_k)
    runs, masked, full = [], [], []
    for round_ in range(max(args.repeats, args.full_repeats, 1)):
        runs.append(run_stage(config, scratch / f"cache-{round_}"))
        masked.append(forward_pass(teacher, batches, args.top_k, masked_only=True))
        if round_ < max(args.full_repeats, 1):
            full.append(forward_pass(teacher, batches, args.top_k, masked_only=False))
    counts = shard_counts(scratch / "cache-0", runs[0]["manifest"])
    identical = len({tuple(s["sha256"] for s in run["manifest"]["shards"]) for run in runs}) == 1
    assert sum(len(values) for values, _ in masked[0][1]) == counts["masked_positions"], "batches differ from the run's"
    end_to_end = end_to_end_section(runs, counts, identical)
    bare = bare_section(end_to_end, runs, [s for s, _ in masked], len(batches), load_s)
    heads = head_section([s for s, _ in masked], [s for s, _ in full], largest_difference(masked[0][1], full[0][1]))
    return {"manifest": runs[0]["manifest"], "end_to_end": end_to_end, "bare_forward": bare, "head": heads}


def end_to_end_section(runs: list[dict], counts: dict, identical: bool) -> dict:
    best = min(runs, key=lambda run: run["total_s"])
    parts = best["parts_s"]
    result = {"total_s": best["total_s"], "one_off_s": best["one_off_s"], "steady_s": best["steady_s"],
              "all_total_s": [run["total_s"] for run in runs], "parts_s": parts, "counts": counts,
              "tokens_per_s": counts["tokens"] / best["total_s"],
              "tokens_per_s_without_one_offs": counts["tokens"] / best["steady_s"],
              "shards_identical_across_rounds": identical}
    one_offs = ", ".join(f"{name.strip('_')} {parts[name]:.2f}" for name in ONE_OFFS)
    say(f"[1] end-to-end stage run(): {best['total_s']:.2f} s (rounds: {_seconds(result['all_total_s'])}), "
        f"of which one-off {best['one_off_s']:.2f} s ({one_offs}; 'Teacher' = model load)")
    say(f"    {counts['tokens']:,} tokens (counted in the shards) in {counts['rows']:,} rows, "
        f"{counts['masked_positions']:,} masked positions, {counts['shards']} shards; shards byte-identical "
        f"across rounds: {'yes' if identical else 'NO'}")
    say(f"    throughput: {result['tokens_per_s']:,.0f} tokens/s with one-offs, "
        f"{result['tokens_per_s_without_one_offs']:,.0f} tokens/s without")
    return result


def bare_section(end_to_end: dict, runs: list[dict], masked_s: list[float], batches: int, load_s: float) -> dict:
    bare = min(masked_s)
    parts = end_to_end["parts_s"]
    # The same ratio within each round (its two timings minutes apart at most): the spread shows machine noise.
    per_round = [run["steady_s"] / seconds for run, seconds in zip(runs, masked_s)]
    result = {"seconds": bare, "all_s": masked_s, "batches": batches, "model_load_s": load_s,
              "tokens_per_s": end_to_end["counts"]["tokens"] / bare,
              "overhead_ratio_with_one_offs": end_to_end["total_s"] / bare,
              "overhead_ratio_without_one_offs": end_to_end["steady_s"] / bare, "goal": OVERHEAD_GOAL,
              "overhead_ratio_without_one_offs_per_round": per_round,
              "in_run_top_k_s": parts["top_k"], "in_run_top_k_over_bare": parts["top_k"] / bare}
    say(f"[2] bare teacher.top_k over the same {batches} batches: {bare:.2f} s (rounds: {_seconds(masked_s)}; "
        f"warmed up, model load {load_s:.2f} s not counted) = {result['tokens_per_s']:,.0f} tokens/s")
    say(f"    overhead, end-to-end / bare: {result['overhead_ratio_with_one_offs']:.2f} with one-offs, "
        f"{result['overhead_ratio_without_one_offs']:.2f} without (goal <= {OVERHEAD_GOAL}); round by round, "
        f"without one-offs: {_seconds(per_round)}")
    other = end_to_end["steady_s"] - parts["score_unit"] - parts["build_table"]
    collate = parts["score_unit"] - parts["top_k"]
    say(f"    where the steady run's {end_to_end['steady_s']:.2f} s went: teacher.top_k {parts['top_k']:.2f} s "
        f"({result['in_run_top_k_over_bare']:.2f} x bare), rest of score_unit {collate:.2f} s, "
        f"build_table {parts['build_table']:.2f} s, other {other:.2f} s (first unit's tokenising and masking, "
        "last shard's write, thread hand-offs)")
    return result


def head_section(masked_s: list[float], full_s: list[float], difference: float) -> dict:
    per_round = [full / masked for full, masked in zip(full_s, masked_s)]  # back-to-back passes in one round
    result = {"masked_only_s": min(masked_s), "full_forward_s": min(full_s), "all_full_forward_s": full_s,
              "full_over_masked": min(full_s) / min(masked_s), "full_over_masked_per_round": per_round,
              "max_abs_logprob_difference": difference}
    say(f"[3] head: masked-only {result['masked_only_s']:.2f} s, full forward {result['full_forward_s']:.2f} s "
        f"(rounds: {_seconds(full_s)}); full / masked-only = {result['full_over_masked']:.2f} (round by round: "
        f"{_seconds(per_round)}), i.e. the masked-only head saves {1 - 1 / result['full_over_masked']:.0%}; "
        f"largest |log-prob difference| between the two {difference:.1e}")
    return result


def bytes_section(scratch: Path, manifest: dict, counts: dict) -> dict:
    positions = counts["masked_positions"]
    half = float16_bytes(scratch / "cache-0", manifest, scratch / "cache-float16")
    result = {"float32": counts["bytes"] / positions, "float16": half / positions,
              "float32_total_bytes": counts["bytes"], "float16_total_bytes": half, "masked_positions": positions}
    say(f"[4] bytes per cached position: float32 {result['float32']:.1f} B, float16 {result['float16']:.1f} B "
        f"(all shard bytes, input ids and doc ids included, / {positions:,} masked positions)")
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
    say(f"[5] peak RSS of the whole stage (fresh process each): {args.documents} documents "
        f"{small['peak_rss_mb']:.0f} MB, {big} documents {large['peak_rss_mb']:.0f} MB ({growth:+.0%}); "
        f"imports alone {small['rss_after_imports_mb']:.0f} MB")
    if small["peak_gpu_allocated_mb"] is not None:
        say(f"    peak GPU memory allocated by torch: {small['peak_gpu_allocated_mb']:.0f} MB and "
            f"{large['peak_gpu_allocated_mb']:.0f} MB")
    say(f"    cold processes, start-up and imports included: {small['seconds']:.1f} s and {large['seconds']:.1f} s")
    return {"runs": runs, "growth": growth}


def _seconds(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    main()
