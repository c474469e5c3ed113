"""Benchmark for stage two, `mdkd train`: it prints figures and is not a test.

It uses mdkd's public API only, so a refactoring of the stage's private helpers cannot break it. From a generated
corpus and a random BERT-shaped teacher it builds a cache with the real stage one, then:

1. runs the real stage two, `mdkd.stages.train.run(config, cache, out)`, for as many steps as are timed below, and
   reads the throughput it logs for every step (its metrics log, `tokens_per_second`); the run also leaves the
   merged vocabulary (its vocab folder) that everything below maps through;
2. times three kinds of optimizer step through one DeepSpeed engine on one student, over the same stream of
   cached rows (`Stream` and `Sampler`, seeded like the run's), interleaved (step i of each kind back to back,
   so a change in machine load hits every kind alike; medians after 2 untimed steps of each):
   - from the cache: draw rows, map them into the student vocabulary, KD + MLM loss, i.e.
     `Sampler.draw` + `micro_batch_backward` + `engine.step`, what `mdkd train` does every step;
   - plain MLM: the same kind of batches already collated in memory, MLM loss only (the floor a step cannot beat);
   - online distillation: the teacher runs on the step's inputs (masked positions only, `Teacher.top_k`) instead
     of reading its predictions; the inputs are the same rows in the teacher's ids, already collated in memory
     (a real online run would tokenise and mask text instead of reading it);
3. reads one epoch of the cache through a fresh `Stream` (every training row loaded from Parquet and mapped).

It prints step(cache) / step(MLM) (goal <= 1.10: reading the cache and the KD loss are nearly free),
step(online) / step(cache) (what the cache saves on every ablation), the Parquet reading throughput in masked
positions per second against what a step consumes, the stage's own logged throughput against the benchmark's
cache step (a check that the timed step is the stage's), and the peak resident memory of this process. Beside
them it reports the counts those figures can be checked against: the cache's rows and masked positions (from its
manifest), the teacher's vocabulary and the vocabulary of the student the stage exported.

The KD loss is `missing_mass: rest`, the default, on both KD paths: it needs the teacher's tempered
log-partition at the loss temperature, which the cache records (its config lists that temperature) and which
`Teacher.top_k` returns for the online step.

Stage two has no device setting (it trains on this rank's GPU when there is one), so neither has this benchmark:
hide the GPUs (CUDA_VISIBLE_DEVICES=) to measure the CPU on a GPU machine.

A third mode, `--student-config FILE --cache DIR`, asks what a real run's step costs against a plain MLM step of
the same student and vocabulary (`run_cost`): the whole step the stage takes, held-out scoring amortised, on a
cache and config of your own (the demo's, say).

    python bench/train.py --tiny                                  # smoke run, seconds
    python bench/train.py                                         # small teacher and student
    python bench/train.py --preset base --precision bf16          # BERT-base sizes, 120k vocabulary (a GPU)
    python bench/train.py --student-config DEMO/configs/mono_taught.yaml --cache DEMO/cache --steps 100

Everything but the figures goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

# bench/common.py: `python bench/<script>.py` puts bench/ first on sys.path
from common import median, peak_memory_above_start, peak_rss_mb, preset_parser, print_figures, say, session
from transformers import AutoConfig

from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.config import TrainConfig, load_train_config
from mdkd.pipeline.distill.data import Example, Sampler, StepLoader, Stream, collate
from mdkd.pipeline.distill.deepspeed_setup import (
    deepspeed_config,
    init_distributed,
    resolve_precision,
)
from mdkd.pipeline.distill.losses import chunk_positions, kd_loss, mlm_loss
from mdkd.pipeline.distill.plan import plan_run
from mdkd.pipeline.distill.run import MetricsLog, RunFolder
from mdkd.pipeline.distill.student import build_student
from mdkd.pipeline.distill.trainer import Distiller, build_sampler
from mdkd.pipeline.distill.training import StepTotals, Supports, micro_batch_backward
from mdkd.pipeline.distill.vocab import Alignment
from mdkd.pipeline.distributed import Ranks, pick_device
from mdkd.pipeline.teacher_pass.config import TeacherSpec
from mdkd.pipeline.teacher_pass.teachers import Teacher, inspect_teacher, pick_dtype
from mdkd.stages import cache_logits
from mdkd.stages import train as train_stage
from mdkd.tiny_models import build_masked_lm, train_tokenizer

TEACHER, LANGUAGE = "teacher", "de"
TEMPERATURE, TOP_K, ALPHA = 2.0, 8, 0.5
MISSING_MASS = "rest"  # needs the cached log-partition at TEMPERATURE: the cache config below asks for it
WARMUP = 2  # untimed steps of each kind before the timed ones
SWEEP_VOCABULARIES = (16_000, 120_000, 250_000)
SWEEP_STEPS, SWEEP_LENGTH, SWEEP_MASKED, SWEEP_DRAWS = 5, 128, 0.15, 64

PRESETS = {
    "tiny": {
        "teacher": {"hidden": 32, "layers": 1, "heads": 2},
        "vocab": 500,
        "documents": 80,
        "micro": 8,
        "steps": 3,
        "student": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 128},
    },
    "small": {
        "teacher": {"hidden": 256, "layers": 4, "heads": 4},
        "vocab": 8000,
        "documents": 1200,
        "micro": 32,
        "steps": 30,
        "student": {"preset": "tiny"},
    },
    "base": {
        "teacher": {"hidden": 768, "layers": 12, "heads": 12},
        "vocab": 120000,
        "documents": 20000,
        "micro": 32,
        "steps": 30,
        "student": {"preset": "base"},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = preset_parser("Benchmark for `mdkd train` (see the module docstring).", PRESETS)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per kind, after {WARMUP} warm-up steps (default: the preset's)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the cache benchmark: the loss at student vocabularies "
        f"{', '.join(f'{v:,}' for v in SWEEP_VOCABULARIES)} (see `vocabulary_sweep`)",
    )
    parser.add_argument("--vocabularies", default=",".join(map(str, SWEEP_VOCABULARIES)), help="for --sweep")
    parser.add_argument("--rows", type=int, default=64, help="--sweep: rows per micro-batch (128 tokens each)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="--sweep: the device's dense peak at this precision, for MFU (an H100/H200 in bf16: 989)",
    )
    parser.add_argument(
        "--logits-per-chunk",
        type=int,
        default=None,
        help="--sweep: the loss's `loss.logits_per_chunk` (default: the configuration's default)",
    )
    parser.add_argument("--sweep-point", type=int, default=None, help=argparse.SUPPRESS)  # one vocabulary, child
    parser.add_argument(
        "--student-config",
        type=Path,
        default=None,
        help="instead of the cache benchmark: the cost of this train config's step on --cache (see `run_cost`)",
    )
    parser.add_argument("--cache", default=None, help="--student-config: the cache it trains on")
    args = parser.parse_args(argv)
    if (args.student_config is None) != (args.cache is None):
        parser.error("--student-config and --cache go together")
    args.steps = max(args.steps or (SWEEP_STEPS if args.sweep else PRESETS[args.preset]["steps"]), 1)
    return args


# ---------------------------------------------------------------- inputs: corpus, teacher, cache, train config


def build_cache(work: Path, preset: dict, seed: int) -> CacheReader:
    """A generated corpus, a random BERT teacher and its cache, written by the real stage one."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sta", "ber", "gen", "tol", "vin", "der", "ung", "lich", "schaft"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(preset["documents"])]
    (work / "de.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer("wordpiece", text[:2000], preset["vocab"], work / "teacher")
    build_masked_lm("bert", tokenizer, work / "teacher", seed=seed, **preset["teacher"])
    config = {
        "corpus": [{"language": LANGUAGE, "path": str(work / "de.txt")}],
        "teachers": [{"name": TEACHER, "model": str(work / "teacher"), "languages": [LANGUAGE]}],
        "max_length": 128,
        "top_k": TOP_K,
        "tail_samples": 0,  # steps as before the tail, comparable with docs/performance.md's figures
        "temperatures": [TEMPERATURE],
        "shard_documents": 256,
    }
    (work / "cache.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cache_logits.run(work / "cache.yaml", work / "cache")
    return CacheReader(work / "cache")


def write_train_config(work: Path, preset: dict, args) -> Path:
    """The stage's config: as many steps as each kind below runs, no held-out documents, one checkpoint."""
    steps = args.steps + WARMUP
    config = {
        "student": {**preset["student"], "dropout": 0.0},
        "loss": {
            "temperature": TEMPERATURE,
            "top_k": TOP_K,
            "alpha": {"schedule": "constant", "start": ALPHA},
            "missing_mass": MISSING_MASS,
        },
        "train": {
            "steps": steps,
            "micro_batch_size": preset["micro"],
            "eval_fraction": 0.0,
            "checkpoint_every": steps,
            "seed": args.seed,
        },
        "precision": args.precision,
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 1. the real stage two


def run_stage(config: Path, cache: CacheReader, out: Path) -> dict:
    """A whole `mdkd train` run: its wall-clock time and the per-step throughput it logs."""
    started = time.perf_counter()
    train_stage.run(config, cache.dir, out)
    seconds = time.perf_counter() - started
    lines = RunFolder(out).metrics.read()
    rates = [line["tokens_per_second"] for line in lines if line["split"] == "train"]
    timed = rates[WARMUP:] or rates  # the first steps pay the warm-up, as in the benchmark's own steps
    return {
        "seconds": seconds,
        "steps": len(rates),
        "tokens_per_second": median(timed),
        "all_tokens_per_second": rates,
    }


# ---------------------------------------------------------------- streams, engine, teacher


def new_sampler(
    cache: CacheReader,
    config: TrainConfig,
    input_map: np.ndarray,
    target_map: np.ndarray,
    temperature_column: int | None,
) -> Sampler:
    """The run's one stream (teacher, language) and a sampler over it, seeded as the stage seeds them."""
    stream = Stream(
        cache,
        TEACHER,
        LANGUAGE,
        seed=config.train.seed,
        eval_fraction=config.train.eval_fraction,
        top_k=config.loss.top_k,
        temperature_column=temperature_column,
        input_map=input_map,
        target_map=target_map,
    )
    return Sampler({stream.key: stream}, {LANGUAGE: 1.0}, {LANGUAGE: {TEACHER: 1.0}}, config.train.seed)


def student_sampler(cache: CacheReader, config: TrainConfig, alignment: Alignment) -> Sampler:
    """Rows mapped into the student vocabulary, with the log-partitions the loss reads (as `mdkd train`)."""
    rest = config.loss.missing_mass == "rest"
    column = cache.manifest.temperatures.index(config.loss.temperature) if rest else None
    return new_sampler(cache, config, alignment.input_map(TEACHER), alignment.id_maps[TEACHER], column)


def teacher_sampler(cache: CacheReader, config: TrainConfig) -> Sampler:
    """The same rows in the same order, left in the teacher's ids (identity maps): the online step's inputs."""
    identity = np.arange(cache.teacher(TEACHER).vocab_size, dtype=np.int64)
    return new_sampler(cache, config, identity, identity, None)


def build_engine(config: TrainConfig, alignment: Alignment, cache: CacheReader, precision: str, device):
    import deepspeed

    init_distributed(device)  # already started by the stage run in this process: then a no-op
    student = build_student(config.student, len(alignment.tokens), cache.manifest.max_length, config.train.seed)
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=deepspeed_config(config, precision, device)
    )
    return engine


def load_teacher(cache: CacheReader, device, precision: str) -> Teacher:
    """The cached teacher, checked and loaded as stage one does, at the student's precision."""
    spec = TeacherSpec(name=TEACHER, model=cache.teacher(TEACHER).model, languages=[LANGUAGE])
    info, problems = inspect_teacher(spec, cache.manifest.top_k, cache.manifest.max_length)
    assert info is not None and not problems, problems
    return Teacher(info, device, pick_dtype(precision, device))


# ---------------------------------------------------------------- 2. three kinds of step


def timed(step, batch) -> float:
    started = time.perf_counter()
    step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def cache_step_fn(engine, sampler: Sampler, config: TrainConfig, seen: dict):
    """The real path: draw and map rows from the cache, then `micro_batch_backward` (KD + MLM) and the step."""
    languages = sampler.languages

    def step(_):
        examples = sampler.draw(config.train.micro_batch_size)
        positions = sum(len(example.positions) for example in examples)
        totals = StepTotals.zeros(len(languages))
        batch = collate(examples, languages)
        micro_batch_backward(engine, batch, ALPHA, config.loss, 1.0 / max(positions, 1), totals)
        engine.step()
        seen["positions"].append(positions)
        seen["tokens"].append(totals.tokens.item())

    return step


def mlm_step_fn(engine):
    def step(batch):
        logits = engine(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"])
        engine.backward(mlm_loss(logits, batch["labels"]).mean())
        engine.step()

    return step


def online_step_fn(engine, teacher: Teacher, alignment: Alignment, config: TrainConfig):
    """The teacher sees its own ids; its top-k are mapped into the student vocabulary like cached ones, and its
    tempered log-partition is what the cache would have held."""
    device = engine.device
    input_map = torch.from_numpy(alignment.input_map(TEACHER)).to(device)
    target_map = torch.from_numpy(alignment.id_maps[TEACHER].astype(np.int64)).to(device)

    def step(batch):
        where = (batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"])
        # The first three of what top_k returns: top-k log-probabilities, their ids, the tempered log-partitions.
        values, ids, partitions = teacher.top_k(*where, k=config.loss.top_k, temperatures=[config.loss.temperature])[:3]
        student_ids = input_map[batch["input_ids"].to(device)]
        logits = engine(student_ids, *(tensor.to(device) for tensor in where[1:]))
        kd = kd_loss(
            student_logits=logits,
            teacher_ids=target_map[ids.to(device).long()],
            teacher_logprobs=values.to(device),
            temperature=config.loss.temperature,
            missing_mass=config.loss.missing_mass,
            teacher_log_partition=partitions[:, 0].to(device),
        )
        mlm = mlm_loss(logits, input_map[batch["labels"].to(device)])
        engine.backward(((1.0 - ALPHA) * mlm + ALPHA * kd).mean())
        engine.step()

    return step


def step_timings(
    engine, teacher: Teacher, cache: CacheReader, alignment: Alignment, config: TrainConfig, steps: int
) -> dict:
    """Median step time of each kind, and of the per-step ratios. MLM and online steps see the same rows (two
    samplers, one seed); the cache step draws the rows that follow them from the same stream."""
    micro, count = config.train.micro_batch_size, steps + WARMUP
    sampler, raw = student_sampler(cache, config, alignment), teacher_sampler(cache, config)
    languages = sampler.languages
    in_memory = [to_device(collate(sampler.draw(micro), languages), engine.device) for _ in range(count)]
    online = [collate(raw.draw(micro), languages, pad_id=teacher.pad_id) for _ in range(count)]
    seen = {"positions": [], "tokens": []}
    kinds = {
        "mlm": (mlm_step_fn(engine), in_memory),
        "cache": (cache_step_fn(engine, sampler, config, seen), [None] * count),  # it draws its own rows
        "online": (online_step_fn(engine, teacher, alignment, config), online),
    }
    times: dict[str, list[float]] = {name: [] for name in kinds}
    # Interleaved: step i of every kind runs back to back, so a change in machine load hits every kind alike.
    for index in range(count):
        for name, (step, batches) in kinds.items():
            seconds = timed(step, batches[index])
            if index >= WARMUP:
                times[name].append(seconds)
    ratios = {
        "cache_over_mlm": [c / m for c, m in zip(times["cache"], times["mlm"], strict=False)],
        "online_over_cache": [o / c for o, c in zip(times["online"], times["cache"], strict=False)],
    }
    return {
        **{name: median(values) for name, values in times.items()},
        **{f"{name}_per_step": median(values) for name, values in ratios.items()},
        "positions_per_step": float(np.mean(seen["positions"])),
        "tokens_per_step": float(np.mean(seen["tokens"])),
    }


# ---------------------------------------------------------------- 3. reading the cache


def reading_throughput(cache: CacheReader, config: TrainConfig, alignment: Alignment) -> dict:
    """One epoch of a fresh stream: every training row read from Parquet and mapped, as the sampler does it."""
    stream = next(iter(student_sampler(cache, config, alignment).streams.values()))
    started = time.perf_counter()
    rows = sum(len(stream.training_rows(index)) for index in range(len(stream.shards)))
    positions = sum(len(stream.example(*stream.next_row()).positions) for _ in range(rows))
    seconds = time.perf_counter() - started
    return {"rows": rows, "positions": positions, "seconds": seconds, "positions_per_second": positions / seconds}


# ---------------------------------------------------------------- the vocabulary sweep (--sweep)


def synthetic_batch(vocab: int, rows: int, generator: np.random.Generator) -> tuple[dict, torch.Tensor]:
    """A collated micro-batch as `mdkd train` builds it, with the default loss's every input: rows of SWEEP_LENGTH
    tokens, SWEEP_MASKED of them masked, top-k ids inside one teacher's support (60% of the vocabulary), their
    log-probabilities and log-partition (the top-k holds half the tempered mass), SWEEP_DRAWS tail draws at the
    loss's temperature. The values are made up; the loss's cost does not depend on them. Returns the batch and
    the support mask [1, V]."""
    support = generator.random(vocab) < 0.6
    support[:5] = True  # the specials
    tokens = np.flatnonzero(support)
    masked = max(1, int(SWEEP_LENGTH * SWEEP_MASKED))
    logprobs = np.log(0.3 / np.arange(1, TOP_K + 1)).astype(np.float32)
    partition = np.float32(np.log(np.exp(logprobs / TEMPERATURE).sum() / 0.5))
    examples = []
    for _ in range(rows):
        drawn = generator.choice(tokens, TOP_K + SWEEP_DRAWS, replace=False)
        examples.append(
            Example(
                language=LANGUAGE,
                input_ids=generator.choice(tokens, SWEEP_LENGTH).astype(np.int64),
                positions=np.sort(generator.choice(SWEEP_LENGTH, masked, replace=False)).astype(np.int64),
                labels=generator.choice(tokens, masked).astype(np.int64),
                topk_ids=np.tile(drawn[:TOP_K], (masked, 1)).astype(np.int64),
                topk_logprobs=np.tile(logprobs, (masked, 1)),
                log_partitions=np.full(masked, partition, dtype=np.float32),
                teacher=TEACHER,
                tail_ids=np.tile(drawn[TOP_K:], (masked, 1)).astype(np.int64),
                tail_counts=np.ones((masked, SWEEP_DRAWS), dtype=np.int64),
                tail_logprobs=np.full((masked, SWEEP_DRAWS), logprobs[-1] - 3.0, dtype=np.float32),
                tail_log_partitions=np.full(masked, partition, dtype=np.float32),
            )
        )
    return collate(examples, [LANGUAGE], teachers=[TEACHER]), torch.from_numpy(support).unsqueeze(0)


def step_flops(student, tokens: int, positions: int) -> float:
    """Training FLOPs of one step: 6 per weight per token for the encoder's matrices, attention's two products
    (QK^T and AV: 12 * layers * length * hidden per token), and the head's projection at masked positions only."""
    config = student.model.config
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    embeddings = sum(p.numel() for name, p in student.named_parameters() if "embeddings" in name)
    encoder = sum(p.numel() for p in student.parameters()) - embeddings - vocab  # less the tied projection's bias
    return 6.0 * encoder * tokens + 12.0 * layers * SWEEP_LENGTH * hidden * tokens + 6.0 * hidden * vocab * positions


def sweep_point(args, vocab: int) -> dict:
    """One vocabulary in this process: KD + MLM steps (the real `micro_batch_backward`, data already collated)
    against plain MLM steps (logits built whole, cross-entropy), interleaved; then the peak memory of each step's
    forward and backward above its start, less that of the encoder alone (its output summed), so that what is
    left is the head's and the loss's."""
    import deepspeed

    device = pick_device("auto", Ranks.from_env())
    init_distributed(device)
    preset = PRESETS[args.preset]
    config = TrainConfig.model_validate(
        {
            "student": {**preset["student"], "dropout": 0.0},
            "loss": {
                "temperature": TEMPERATURE,
                "top_k": TOP_K,
                "missing_mass": "support",
                **({} if args.logits_per_chunk is None else {"logits_per_chunk": args.logits_per_chunk}),
            },
            "train": {"steps": 1, "micro_batch_size": args.rows},
            "precision": args.precision,
        }
    )
    precision = resolve_precision(config.precision, device)
    student = build_student(config.student, vocab, SWEEP_LENGTH, args.seed)
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=deepspeed_config(config, precision, device)
    )
    generator = np.random.default_rng(args.seed)
    batch, support = synthetic_batch(vocab, args.rows, generator)
    positions = len(batch["labels"])
    supports = Supports([TEACHER], support.to(engine.device), tail_temperature=TEMPERATURE)
    on_device = to_device(batch, engine.device)
    where = (on_device["input_ids"], on_device["attention_mask"], on_device["rows"], on_device["cols"])

    def distillation_pass():
        micro_batch_backward(engine, batch, ALPHA, config.loss, 1.0 / positions, StepTotals.zeros(1), supports)

    def mlm_pass():
        engine.backward(mlm_loss(engine(*where), on_device["labels"]).sum() / positions)

    def encoder_pass():
        model = engine.module.model
        hidden = getattr(model, engine.module.adapter.encoder)(input_ids=where[0], attention_mask=where[1])[0]
        engine.backward(hidden[where[2], where[3]].float().square().sum() / positions)

    def step(work):
        return lambda _: (work(), engine.step())

    times = {"distillation": [], "mlm": []}
    for index in range(WARMUP + args.steps):
        for name, work in (("distillation", distillation_pass), ("mlm", mlm_pass)):
            seconds = timed(step(work), None)
            if index >= WARMUP:
                times[name].append(seconds)
    memory = {}
    for name, work in (("encoder", encoder_pass), ("mlm", mlm_pass), ("distillation", distillation_pass)):
        memory[name] = peak_memory_above_start(work, engine.device)
        engine.step()
    one_logits = positions * vocab * 4  # one [positions x vocabulary] fp32 tensor
    tokens = int(batch["attention_mask"].sum())
    flops = step_flops(engine.module, tokens, positions)
    distillation, mlm = median(times["distillation"]), median(times["mlm"])
    return {
        "vocabulary": vocab,
        "device": str(device),
        "precision": precision,
        "positions": positions,
        "tokens": tokens,
        "chunk_positions": chunk_positions(vocab, config.loss),
        "step_seconds_distillation": distillation,
        "step_seconds_mlm": mlm,
        "distillation_over_mlm": distillation / mlm,
        "distillation_over_mlm_per_step": median(
            [d / m for d, m in zip(times["distillation"], times["mlm"], strict=True)]
        ),
        "tokens_per_second": tokens / distillation,
        "mfu": None if args.peak_tflops is None else flops / distillation / (args.peak_tflops * 1e12),
        "mlm_mfu": None if args.peak_tflops is None else flops / mlm / (args.peak_tflops * 1e12),
        "one_logits_bytes": one_logits,
        "extra_peak_bytes_distillation": memory["distillation"] - memory["encoder"],
        "extra_peak_bytes_mlm": memory["mlm"] - memory["encoder"],
        "extra_peak_over_logits_distillation": (memory["distillation"] - memory["encoder"]) / one_logits,
        "extra_peak_over_logits_mlm": (memory["mlm"] - memory["encoder"]) / one_logits,
        "peak_bytes_encoder": memory["encoder"],
        "memory_measured_by": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "VmHWM - VmRSS, MALLOC_MMAP_THRESHOLD_=65536",
        "threads": torch.get_num_threads(),
    }


def vocabulary_sweep(args) -> dict:
    """Each vocabulary in a fresh process (so one's memory cannot inflate another's peak), with glibc told to map
    every allocation of 64 KiB or more on its own, which makes the resident set follow the live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    points = []
    for vocab in (int(v) for v in args.vocabularies.split(",")):
        command = [sys.executable, __file__, "--sweep-point", str(vocab), "--preset", args.preset]
        command += ["--precision", args.precision, "--rows", str(args.rows), "--steps", str(args.steps)]
        command += ["--seed", str(args.seed)] + (
            [] if args.peak_tflops is None else ["--peak-tflops", str(args.peak_tflops)]
        )
        command += [] if args.logits_per_chunk is None else ["--logits-per-chunk", str(args.logits_per_chunk)]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"preset": args.preset, "rows": args.rows, "timed_steps": args.steps, "points": points}


def report_sweep(figures: dict) -> None:
    say(
        f"{figures['preset']} student, {figures['rows']} rows x {SWEEP_LENGTH} tokens, loss `support` with a "
        f"{SWEEP_DRAWS}-draw tail, median of {figures['timed_steps']} timed steps per kind"
    )
    say("vocabulary  positions  chunk  MLM step  KD+MLM step  ratio (per step)  extra peak / [N x V] fp32: KD+MLM, MLM")
    for p in figures["points"]:
        say(
            f"{p['vocabulary']:>10,}  {p['positions']:>9,}  {p['chunk_positions']:>5}  {p['step_seconds_mlm']:7.3f} s  "
            f"{p['step_seconds_distillation']:9.3f} s  {p['distillation_over_mlm']:.3f} "
            f"({p['distillation_over_mlm_per_step']:.3f})  {p['extra_peak_over_logits_distillation']:.2f}, "
            f"{p['extra_peak_over_logits_mlm']:.2f}"
        )
    print_figures(figures)


# ---------------------------------------------------------------- a real run's step (--student-config)


def run_cost(args, work: Path) -> dict:
    """What one step of a real run costs, held-out scoring included, against a plain MLM step of its student.

    An untimed `mdkd train` run of E steps (E the config's held-out interval) builds the run folder (merged
    vocabulary, held-out documents) and pays the one-off costs (imports, DeepSpeed's op, the cache's first reads).
    Then two engines live side by side in this process:
    - the stage's: a `Distiller` built from the same config, cache and run folder, stepped as `fit` steps it
      (`train_step` on a `StepLoader`, the records logged to a metrics file, `evaluate` every E steps);
    - a plain MLM step's: the same student (fresh weights, the run's merged vocabulary) through a DeepSpeed engine
      built the stage's way, on batches of the run's own data already collated in memory.
    They take turns in blocks of E steps (each block of the stage's ends with its held-out scoring), the first
    turn of each kind untimed and the order swapped every round, so that the machine's speed, which drifts by tens
    of percent over minutes on a shared VM, reaches both sides of each ratio alike. The figure is the median over
    rounds of (stage block) / (MLM block); the same without the scoring is the block's training steps alone."""
    import deepspeed

    source = load_train_config(args.student_config)
    every = source.train.eval_every or source.train.checkpoint_every
    rounds = max(1, -(-args.steps // every))
    raw = yaml.safe_load(args.student_config.read_text(encoding="utf-8"))

    def write_config(name: str, steps: int) -> Path:
        config = {**raw, "train": {**raw["train"], "steps": steps, "checkpoint_every": steps}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    train_stage.run(write_config("warm-up", every), args.cache, work / "warm-up")
    run = RunFolder(work / "warm-up")
    cache = CacheReader(args.cache)
    # The stage's engine is a fresh run of (rounds + 1) × E steps, the untimed round first: its lr and α follow that.
    config = load_train_config(write_config("timed", every * (rounds + 1)))
    plan = plan_run(config, cache.manifest)
    alignment = Alignment.load(run.vocab_dir, plan.teachers)
    ranks = Ranks.from_env()
    device = pick_device("auto", ranks)
    precision = resolve_precision(config.precision, device)
    distiller = Distiller(config, cache, plan, alignment, run, ranks, device, precision)
    loop = config.train
    loader = StepLoader(
        distiller.sampler,
        loop.steps,
        loop.micro_batch_size,
        loop.gradient_accumulation,
        ranks.rank,
        ranks.world_size,
        None if distiller.supports is None else distiller.supports.teachers,
    )
    logger = MetricsLog(work / "timed-metrics.jsonl")

    def stage_block() -> tuple[float, float]:
        """E of the stage's steps and the held-out scoring that ends them: (seconds in all, seconds scoring)."""
        started = time.perf_counter()
        for _ in range(every):
            record = distiller.train_step(loader)
            logger.log([record])
        scoring = time.perf_counter()
        logger.log([distiller.evaluate()])
        ended = time.perf_counter()
        return ended - started, ended - scoring

    student = build_student(config.student, len(alignment.tokens), cache.manifest.max_length, loop.seed)
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=deepspeed_config(config, precision, device)
    )
    sampler = build_sampler(cache, plan, alignment, config)
    batches = [
        to_device(collate(sampler.draw(loop.micro_batch_size), sampler.languages), engine.device) for _ in range(every)
    ]
    mlm_step = mlm_step_fn(engine)

    def mlm_block() -> float:
        return sum(timed(mlm_step, batch) for batch in batches)

    try:
        stage_block(), mlm_block()  # untimed: each engine's first steps
        blocks = []
        for index in range(rounds):
            if index % 2:
                mlm = mlm_block()
                stage, scoring = stage_block()
            else:
                stage, scoring = stage_block()
                mlm = mlm_block()
            blocks.append({"stage": stage, "scoring": scoring, "mlm": mlm})
    finally:
        loader.close()
    with_scoring = [b["stage"] / b["mlm"] for b in blocks]
    without_scoring = [(b["stage"] - b["scoring"]) / b["mlm"] for b in blocks]
    lines = logger.read()
    train_lines = [line for line in lines if line["split"] == "train"]
    return {
        "config": str(args.student_config),
        "device": str(device),
        "precision": precision,
        "student_vocabulary": len(alignment.tokens),
        "micro_batch_size": loop.micro_batch_size,
        "eval_every": every,
        "rounds": rounds,
        "timed_steps": rounds * every,
        "blocks": blocks,
        "step_over_mlm": median(with_scoring),
        "step_over_mlm_rounds": with_scoring,
        "step_without_scoring_over_mlm": median(without_scoring),
        "step_seconds_with_scoring": median([b["stage"] / every for b in blocks]),
        "step_seconds_without_scoring": median([(b["stage"] - b["scoring"]) / every for b in blocks]),
        "step_seconds_mlm": median([b["mlm"] / every for b in blocks]),
        "scoring_seconds": median([b["scoring"] for b in blocks]),
        "logged_train_steps": len(train_lines),
        "logged_scorings": sum(line["split"] == "heldout" for line in lines),
        "logged_tokens_per_second_mean": float(np.mean([line["tokens_per_second"] for line in train_lines])),
        "threads": torch.get_num_threads(),
    }


def report_run_cost(figures: dict) -> None:
    say(
        f"{figures['config']} on {figures['device']} ({figures['precision']}), student vocabulary "
        f"{figures['student_vocabulary']:,}, micro-batch {figures['micro_batch_size']}, held-out scoring every "
        f"{figures['eval_every']} steps; {figures['rounds']} rounds of {figures['eval_every']} steps of each kind"
    )
    say(
        f"medians over rounds: the stage's step {figures['step_seconds_with_scoring'] * 1e3:.1f} ms with the scoring "
        f"amortised ({figures['scoring_seconds']:.2f} s a scoring), "
        f"{figures['step_seconds_without_scoring'] * 1e3:.1f} ms without; plain MLM step "
        f"{figures['step_seconds_mlm'] * 1e3:.1f} ms"
    )
    rounds = ", ".join(f"{ratio:.2f}" for ratio in figures["step_over_mlm_rounds"])
    say(
        f"step / MLM step: {figures['step_over_mlm']:.3f} (goal <= 1.3; rounds: {rounds}); without the scoring "
        f"{figures['step_without_scoring_over_mlm']:.3f}"
    )
    print_figures(figures)


# ---------------------------------------------------------------- the benchmark and its report


def benchmark(args, work: Path) -> dict:
    preset = PRESETS[args.preset]
    device = pick_device("auto", Ranks.from_env())  # what stage two itself picks
    cache = build_cache(work, preset, args.seed)
    config_path = write_train_config(work, preset, args)
    config = load_train_config(config_path)
    stage = run_stage(config_path, cache, work / "run")
    run = RunFolder(work / "run")
    alignment = Alignment.load(run.vocab_dir, [TEACHER])
    reading = reading_throughput(cache, config, alignment)
    precision = resolve_precision(config.precision, device)
    engine = build_engine(config, alignment, cache, precision, device)
    steps = step_timings(engine, load_teacher(cache, device, precision), cache, alignment, config, args.steps)
    return {
        "preset": args.preset,
        "device": str(device),
        "precision": precision,
        "missing_mass": config.loss.missing_mass,
        "student_vocabulary": len(alignment.tokens),
        "exported_student_vocabulary": AutoConfig.from_pretrained(run.student_dir).vocab_size,
        "teacher_vocabulary": cache.teacher(TEACHER).vocab_size,
        "micro_batch_size": config.train.micro_batch_size,
        "timed_steps": args.steps,
        "step_seconds_mlm": steps["mlm"],
        "step_seconds_cache": steps["cache"],
        "step_seconds_online": steps["online"],
        "cache_over_mlm": steps["cache"] / steps["mlm"],
        "online_over_cache": steps["online"] / steps["cache"],
        "cache_over_mlm_per_step": steps["cache_over_mlm_per_step"],
        "online_over_cache_per_step": steps["online_over_cache_per_step"],
        "read_positions_per_second": reading["positions_per_second"],
        "read_rows": reading["rows"],
        "read_positions": reading["positions"],
        "cache_rows": cache.manifest.totals.rows,
        "cache_masked_positions": cache.manifest.totals.masked_positions,
        "positions_per_step": steps["positions_per_step"],
        "positions_consumed_per_second": steps["positions_per_step"] / steps["cache"],
        "bench_cache_tokens_per_second": steps["tokens_per_step"] / steps["cache"],
        "stage_seconds": stage["seconds"],
        "stage_steps": stage["steps"],
        "stage_tokens_per_second": stage["tokens_per_second"],
        "stage_all_tokens_per_second": stage["all_tokens_per_second"],
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def report(figures: dict) -> None:
    print(
        f"{figures['preset']} preset on {figures['device']}, {figures['precision']}, student vocabulary "
        f"{figures['student_vocabulary']:,}, micro-batch {figures['micro_batch_size']}, KD missing mass "
        f"{figures['missing_mass']}; median of {figures['timed_steps']} timed steps per kind"
    )
    print(
        f"step time: plain MLM {figures['step_seconds_mlm'] * 1e3:.1f} ms, from the cache "
        f"{figures['step_seconds_cache'] * 1e3:.1f} ms, online teacher {figures['step_seconds_online'] * 1e3:.1f} ms"
    )
    print(
        f"cache / MLM = {figures['cache_over_mlm']:.3f} (goal <= 1.10); online / cache = "
        f"{figures['online_over_cache']:.2f} (medians of the step-by-step ratios: "
        f"{figures['cache_over_mlm_per_step']:.3f} and {figures['online_over_cache_per_step']:.2f})"
    )
    print(
        f"Parquet reading: {figures['read_positions_per_second']:,.0f} masked positions/s; a step consumes "
        f"{figures['positions_consumed_per_second']:,.0f}/s"
    )
    print(
        f"the stage's own log: {figures['stage_tokens_per_second']:,.0f} tokens/s per step (median), the "
        f"benchmark's cache step {figures['bench_cache_tokens_per_second']:,.0f}; whole `mdkd train` run of "
        f"{figures['stage_steps']} steps {figures['stage_seconds']:.1f} s (set-up, checkpoint and export included)"
    )
    print(f"peak RSS {figures['peak_rss_mb']:.0f} MB")
    print_figures(figures)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.sweep_point is not None:
        with contextlib.redirect_stdout(sys.stderr):
            figures = sweep_point(args, args.sweep_point)
        print_figures(figures)
        return
    if args.sweep:
        report_sweep(vocabulary_sweep(args))
        return
    if args.student_config is not None:
        with session("mdkd-bench-train-") as scratch:
            figures = run_cost(args, scratch)
        report_run_cost(figures)
        return
    with session("mdkd-bench-train-") as scratch:
        figures = benchmark(args, scratch)
    report(figures)


if __name__ == "__main__":
    main()
