"""Benchmark for stage one, `mdkd cache-logits`: prints figures, asserts nothing (it is not a test).

What it measures, on a BERT-shaped teacher with random weights and a generated, seeded corpus:

1. End-to-end: the real stage, `mdkd.stages.cache_logits.run(config, out)`, timed as a whole and with its
   one-off costs (corpus scan and fingerprint, teacher checks, model load, manifest writing) timed apart, so
   throughput is reported both with and without them. Tokens are counted from the shards it wrote
   (sum of len(input_ids) over all rows).
2. Bare forward: the same batches rebuilt with the pipeline's own functions (prepare_unit, length_batches,
   collate, Masker), timing only `Teacher.top_k` calls. End-to-end time / bare time is the pipeline's
   overhead; the goal is <= 1.15.
3. Masked-only head: `Teacher.top_k` with the architecture adapter (encoder on the whole batch, MLM head only
   at masked positions) against the full `*ForMaskedLM` forward (adapter set to None), same batches.
4. Bytes per cached position: total shard bytes / masked positions, for float32 log-probabilities (what the
   run wrote) and float16 (the same shards rewritten with the stage's own shard writer).
5. Peak RSS of the whole stage at N and 4N documents, each in a fresh process so the peaks do not mix; the
   corpus is streamed in blocks of `shard_documents`, so it should barely grow.

Run it from the repository root:

    python bench/cache_logits.py                                          # small teacher on the CPU, ~2 min
    python bench/cache_logits.py --preset base --device cuda --dtype bf16 # BERT-base, 120k vocabulary

The last line of the output is one JSON object holding every figure.
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
import pyarrow.parquet as pq
import torch
import yaml

from mdkd.pipeline import manifest as mf
from mdkd.pipeline.config import load_cache_config
from mdkd.pipeline.corpus import read_language
from mdkd.pipeline.distributed import Ranks, pick_device
from mdkd.pipeline.masking import Masker
from mdkd.pipeline.shards import read_shard, write_shard
from mdkd.pipeline.teachers import ADAPTERS, Teacher, inspect_teacher, pick_dtype
from mdkd.pipeline.tiny_models import build_masked_lm, train_tokenizer
from mdkd.pipeline.windows import collate, length_batches, prepare_unit
from mdkd.stages import cache_logits as stage

OVERHEAD_GOAL = 1.15
LANGUAGE = "xx"

# `word_types` is the size of the generated word list the tokenizer is trained on. For `base` it must exceed
# the 120k target so WordPiece really learns 120k tokens: the tokenizer then has 120k entries, the model's
# vocabulary matches it, and Teacher.vocab_limit (= len(tokenizer)) covers the whole head. That keeps the
# head-cost figure honest (log-softmax and top-k over all 120k ids, as with a real multilingual BERT) without
# patching vocab_limit behind the stage's back. Training it takes ~5 s.
PRESETS = {
    "small": dict(hidden=128, layers=2, heads=2, vocab=8_000, word_types=20_000, documents=512),
    "base": dict(hidden=768, layers=12, heads=12, vocab=120_000, word_types=200_000, documents=4096),
}
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "er", "or", "st"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--documents", type=int, default=None, help="corpus size N (default: the preset's)")
    parser.add_argument("--shard-documents", type=int, default=128,
                        help="documents per shard; small enough that N documents make several shards, so the "
                             "prefetch and writer threads overlap with the teacher as in a long run")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2, help="bare-forward passes per mode; the fastest counts")
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
    """One document per line. Words follow a Zipf law (like real text, so the tokenizer's frequent pieces are
    frequent); lengths are log-normal (median ~60 words, a tail of long documents that need several windows)."""
    rng = random.Random(seed)
    cumulative = list(_cumsum(1.0 / (rank + 1) for rank in range(len(words))))
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(documents):
            length = min(1500, max(3, int(rng.lognormvariate(math.log(60), 0.9))))
            sentence = rng.choices(words, cum_weights=cumulative, k=length)
            handle.write(" ".join(sentence).capitalize() + ".\n")


def _cumsum(values):
    total = 0.0
    for value in values:
        total += value
        yield total


def build_teacher(preset: dict, words: list[str], folder: Path) -> tuple[int, int]:
    """Train a WordPiece tokenizer on the word list and save a random BERT for it; return (vocab, parameters)."""
    lines = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    tokenizer = train_tokenizer("wordpiece", lines, preset["vocab"], folder)
    model = build_masked_lm("bert", tokenizer, folder, hidden=preset["hidden"], layers=preset["layers"],
                            heads=preset["heads"])
    return len(tokenizer), sum(p.numel() for p in model.parameters())


def write_config(path: Path, corpus: Path, teacher: Path, args, logprobs_dtype: str = "float32") -> Path:
    config = {
        "corpus": [{"language": LANGUAGE, "path": str(corpus)}],
        "teachers": [{"name": "bert", "model": str(teacher), "languages": [LANGUAGE]}],
        "masking": {"probability": 0.15, "seed": args.seed, "copies": 1},
        "max_length": args.max_length,
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "dtype": args.dtype,
        "device": args.device_name,
        "logprobs_dtype": logprobs_dtype,
        "shard_documents": args.shard_documents,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. end-to-end run of the real stage

# Stage functions whose time does not grow with the corpus's teacher work: done once per run (the corpus scan
# reads the corpus once but is I/O and hashing, not teacher work). Wrapped at runtime, never edited.
ONE_OFFS = ("_scan_corpus", "_inspect_teachers", "_identity", "_check_out_dir", "_claim_out_dir", "Teacher",
            "_finish_manifest")


@contextlib.contextmanager
def instrumented_stage(seconds: dict[str, float]):
    """Time the stage's one-off steps and its in-run teacher calls by wrapping module attributes; restore after."""
    originals = {name: getattr(stage, name) for name in ONE_OFFS}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def load_teacher(*args, **kwargs):
        teacher = timed("Teacher", originals["Teacher"])(*args, **kwargs)
        teacher.top_k = timed("in_run_top_k", teacher.top_k)  # instance attribute: only this run's teacher
        return teacher

    for name in ONE_OFFS:
        setattr(stage, name, load_teacher if name == "Teacher" else timed(name, originals[name]))
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
            "parts_s": seconds}


def shard_counts(out: Path, manifest: dict) -> dict:
    """Tokens, rows, masked positions and bytes, read from the shards themselves (tokens) and the manifest."""
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
    info, problems = inspect_teacher(config.teachers[0], config.top_k)
    assert not problems, problems
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


def time_top_k(teacher: Teacher, batches: list[tuple], k: int, repeats: int) -> tuple[float, list]:
    """Fastest of `repeats` passes over all batches, timing only teacher.top_k; a warm-up call comes first so
    one-off kernel selection and allocator growth are not counted (the stage pays them once per run)."""
    teacher.top_k(*batches[0], k=k)
    best, outputs = math.inf, []
    for _ in range(repeats):
        outputs = []
        started = time.perf_counter()
        for batch in batches:
            outputs.append(teacher.top_k(*batch, k=k))
        best = min(best, time.perf_counter() - started)
    return best, outputs


def compare_heads(teacher: Teacher, batches: list[tuple], k: int, repeats: int) -> dict:
    """Masked-only head (the adapter) vs the full forward (adapter None forces the fallback), same batches."""
    adapter = teacher.adapter
    assert adapter is ADAPTERS["bert"], "the benchmark teacher should use the BERT adapter"
    masked_s, masked_out = time_top_k(teacher, batches, k, repeats)
    teacher.adapter = None
    try:
        full_s, full_out = time_top_k(teacher, batches, k, repeats)
    finally:
        teacher.adapter = adapter
    # Same numbers either way is the adapter's contract; report the largest difference as a sanity check.
    difference = max(float((a[0] - b[0]).abs().max()) for a, b in zip(masked_out, full_out))
    return {"masked_only_s": masked_s, "full_forward_s": full_s, "full_over_masked": full_s / masked_s,
            "max_abs_logprob_difference": difference, "positions": sum(len(v) for v, _ in masked_out)}


# ---------------------------------------------------------------- 4. bytes per cached position


def float16_bytes(out: Path, manifest: dict, scratch: Path) -> int:
    """Shard bytes had the run stored float16 log-probabilities: each shard's table with that one column cast
    (what build_table does for logprobs_dtype float16), written by the stage's own writer and settings.
    Cheaper than a second teacher pass and the same bytes up to float rounding."""
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
    before = _max_rss_mb()
    with contextlib.redirect_stdout(sys.stderr):
        manifest = stage.run(Path(config), Path(out))
    print(json.dumps({"rss_after_imports_mb": before, "peak_rss_mb": _max_rss_mb(),
                      "documents": manifest["totals"]["documents"]}))


def _max_rss_mb() -> float:
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


# ---------------------------------------------------------------- report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no GPU here (use --device cpu)")
    return requested


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
            print(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(figures, sort_keys=False))


def benchmark(args, preset: dict, scratch: Path) -> dict:
    device = torch.device(args.device_name)
    figures = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(device)}
    say(f"machine: {figures['machine']['cpu']}, {figures['machine']['cpu_count']} CPUs, torch threads "
        f"{figures['machine']['torch_threads']}, GPU: {figures['machine']['gpu'] or 'none'}; device {device}, "
        f"dtype {args.dtype}")

    started = time.perf_counter()
    words = make_words(preset["word_types"], args.seed)
    vocab, parameters = build_teacher(preset, words, scratch / "teacher")
    corpus = scratch / "corpus.txt"
    write_corpus(corpus, words, args.documents, args.seed)
    config = write_config(scratch / "cache.yaml", corpus, scratch / "teacher", args)
    figures["setup"] = {"preset": args.preset, "hidden": preset["hidden"], "layers": preset["layers"],
                        "heads": preset["heads"], "vocab": vocab, "parameters": parameters,
                        "documents": args.documents, "shard_documents": args.shard_documents,
                        "max_length": args.max_length, "top_k": args.top_k, "batch_tokens": args.batch_tokens,
                        "dtype": args.dtype, "device": str(device), "seconds": time.perf_counter() - started}
    say(f"teacher: random BERT, hidden {preset['hidden']}, {preset['layers']} layers, {preset['heads']} heads, "
        f"vocab {vocab:,}, {parameters / 1e6:.1f}M parameters (built in {figures['setup']['seconds']:.1f} s, "
        "not counted below)")
    say(f"corpus: {args.documents} generated documents, shards of {args.shard_documents}, max_length "
        f"{args.max_length}, top_k {args.top_k}, batch_tokens {args.batch_tokens}")

    figures["end_to_end"] = end_to_end_section(config, scratch / "cache")
    manifest = figures["end_to_end"].pop("manifest")
    figures["bare_forward"] = bare_forward_section(config, args, figures["end_to_end"])
    figures["bytes_per_position"] = bytes_section(scratch, manifest, figures["end_to_end"]["counts"])
    if not args.skip_rss:
        figures["peak_rss"] = rss_section(scratch, corpus, words, args)
    return figures


def say(line: str) -> None:
    print(line, flush=True)


def end_to_end_section(config: Path, out: Path) -> dict:
    result = run_stage(config, out)
    counts = result["counts"] = shard_counts(out, result["manifest"])
    parts = result.pop("parts_s")
    result["one_off_parts_s"] = {name: parts.get(name, 0.0) for name in ONE_OFFS}
    result["in_run_top_k_s"] = parts.get("in_run_top_k", 0.0)
    result["tokens_per_s"] = counts["tokens"] / result["total_s"]
    result["tokens_per_s_without_one_offs"] = counts["tokens"] / result["steady_s"]
    shown = ", ".join(f"{name.strip('_')} {seconds:.2f}" for name, seconds in result["one_off_parts_s"].items())
    say(f"[1] end-to-end stage run(): {result['total_s']:.2f} s, of which one-off {result['one_off_s']:.2f} s "
        f"({shown}; 'Teacher' is the model load)")
    say(f"    {counts['tokens']:,} tokens in {counts['rows']:,} rows, {counts['masked_positions']:,} masked "
        f"positions, {counts['shards']} shards (tokens counted from the shards)")
    say(f"    throughput: {result['tokens_per_s']:,.0f} tokens/s including one-offs, "
        f"{result['tokens_per_s_without_one_offs']:,.0f} tokens/s without")
    return result


def bare_forward_section(config: Path, args, end_to_end: dict) -> dict:
    teacher, tokenizer, load_s = load_teacher(config)
    batches = rebuild_batches(config, teacher, tokenizer)
    heads = compare_heads(teacher, batches, args.top_k, args.repeats)
    assert heads["positions"] == end_to_end["counts"]["masked_positions"], "rebuilt batches differ from the run's"
    bare = heads["masked_only_s"]
    result = {"batches": len(batches), "model_load_s": load_s, "seconds": bare, **heads,
              "tokens_per_s": end_to_end["counts"]["tokens"] / bare,
              "overhead_ratio_with_one_offs": end_to_end["total_s"] / bare,
              "overhead_ratio_without_one_offs": end_to_end["steady_s"] / bare,
              "in_run_top_k_over_bare": end_to_end["in_run_top_k_s"] / bare, "goal": OVERHEAD_GOAL}
    say(f"[2] bare teacher.top_k over the same {len(batches)} batches: {bare:.2f} s (fastest of {args.repeats}, "
        f"after a warm-up call; model load {load_s:.2f} s not counted) = {result['tokens_per_s']:,.0f} tokens/s")
    say(f"    overhead end-to-end / bare: {result['overhead_ratio_with_one_offs']:.2f} with one-offs, "
        f"{result['overhead_ratio_without_one_offs']:.2f} without (goal <= {OVERHEAD_GOAL})")
    say(f"    time inside teacher.top_k during the run: {end_to_end['in_run_top_k_s']:.2f} s "
        f"= {result['in_run_top_k_over_bare']:.2f} x bare (the rest of the run is collate, table building, "
        "and waiting on the prefetch/writer threads)")
    say(f"[3] head: masked-only {heads['masked_only_s']:.2f} s, full forward {heads['full_forward_s']:.2f} s, "
        f"full / masked-only = {heads['full_over_masked']:.2f} (saves "
        f"{1 - 1 / heads['full_over_masked']:.0%}); max |logprob difference| {heads['max_abs_logprob_difference']:.1e}")
    return result


def bytes_section(scratch: Path, manifest: dict, counts: dict) -> dict:
    positions = counts["masked_positions"]
    half = float16_bytes(scratch / "cache", manifest, scratch / "cache-float16")
    result = {"float32": counts["bytes"] / positions, "float16": half / positions,
              "float32_total_bytes": counts["bytes"], "float16_total_bytes": half, "masked_positions": positions}
    say(f"[4] bytes per cached position: float32 {result['float32']:.1f} B, float16 {result['float16']:.1f} B "
        f"(all shard bytes, input ids and doc ids included, / {positions:,} masked positions)")
    return result


def rss_section(scratch: Path, corpus: Path, words: list[str], args) -> dict:
    """Peak RSS at N documents (the corpus already made) and at rss_factor x N (a new one), fresh process each."""
    big = scratch / "corpus-big.txt"
    write_corpus(big, words, args.documents * args.rss_factor, args.seed + 1)
    sizes = {args.documents: corpus, args.documents * args.rss_factor: big}
    runs = {}
    for documents, path in sizes.items():
        config = write_config(scratch / f"cache-{documents}.yaml", path, scratch / "teacher", args)
        runs[str(documents)] = peak_rss(config, scratch / f"rss-{documents}")
    small, large = runs[str(args.documents)], runs[str(args.documents * args.rss_factor)]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    say(f"[5] peak RSS (fresh process each, whole stage): {args.documents} documents {small['peak_rss_mb']:.0f} MB, "
        f"{args.documents * args.rss_factor} documents {large['peak_rss_mb']:.0f} MB ({growth:+.1%}); "
        f"after imports alone {small['rss_after_imports_mb']:.0f} MB")
    return {"runs": runs, "growth": growth}


if __name__ == "__main__":
    main()
