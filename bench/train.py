"""Benchmark for stage two, `mdkd train`: it prints figures and is not a test.

On one student and one stream of batches drawn from a real cache (built here by stage one from a generated corpus
and a random BERT-shaped teacher), it times three kinds of optimizer step through the same DeepSpeed engine:

1. from the cache: read rows, map them into the student vocabulary, KD + MLM loss (what `mdkd train` does);
2. plain MLM: the same batches already in memory, MLM loss only (the floor a training step cannot beat);
3. online distillation: the teacher runs on the step's inputs (masked positions only) instead of the cache.

It prints step(cache) / step(MLM) (goal <= 1.10: reading the cache and the KD loss are nearly free),
step(online) / step(cache) (what the cache saves on every ablation), the Parquet reading throughput in masked
positions per second against what a step consumes, and peak resident memory.

    python bench/train.py                                       # small teacher and student on the CPU
    python bench/train.py --preset base --device cuda --precision bf16

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdkd.pipeline.distill.data import ShardRows, collate  # noqa: E402
from mdkd.pipeline.distill.deepspeed_setup import deepspeed_config, init_distributed  # noqa: E402
from mdkd.pipeline.distill.losses import kd_loss, mlm_loss  # noqa: E402
from mdkd.pipeline.cache.manifest import load_manifest  # noqa: E402
from mdkd.pipeline.distill.student import build_student  # noqa: E402
from mdkd.pipeline.teacher_pass.teachers import Teacher, inspect_teacher  # noqa: E402
from mdkd.demo.tiny_models import build_masked_lm, train_tokenizer  # noqa: E402
from mdkd.pipeline.distill.config import TrainConfig  # noqa: E402
from mdkd.pipeline.distill.training import StepTotals, micro_batch_backward  # noqa: E402
from mdkd.pipeline.teacher_pass.config import TeacherSpec  # noqa: E402
from mdkd.stages import cache_logits  # noqa: E402
from mdkd.stages.train import _build_vocabulary, _sampler, select_teachers  # noqa: E402
from mdkd.pipeline.distill.vocab import Alignment  # noqa: E402

PRESETS = {
    "small": dict(teacher=dict(hidden=256, layers=4, heads=4), vocab=8000, student="tiny", documents=1200, micro=32),
    "base": dict(teacher=dict(hidden=768, layers=12, heads=12), vocab=120000, student="base", documents=20000, micro=32),
}


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would include a parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_cache(work: Path, preset: dict, device: str, seed: int = 0) -> Path:
    """A generated corpus, a random BERT teacher and its cache, written by the real stage one."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sta", "ber", "gen", "tol", "vin", "der", "ung", "lich", "schaft"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(preset["documents"])]
    (work / "de.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer("wordpiece", text[:2000], preset["vocab"], work / "teacher")
    build_masked_lm("bert", tokenizer, work / "teacher", seed=seed, **preset["teacher"])
    config = {
        "corpus": [{"language": "de", "path": str(work / "de.txt")}],
        "teachers": [{"name": "teacher", "model": str(work / "teacher"), "languages": ["de"]}],
        "max_length": 128, "top_k": 8, "shard_documents": 256, "device": device,
    }
    (work / "cache.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    cache_logits.run(work / "cache.yaml", work / "cache")
    return work / "cache"


def time_steps(step, batches, warmup: int = 2) -> float:
    """Median seconds per step over `batches` (after `warmup` untimed steps)."""
    for batch in batches[:warmup]:
        step(batch)
    times = []
    for batch in batches[warmup:]:
        started = time.perf_counter()
        step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per kind (after 2 warm-up steps)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cache = build_cache(work, preset, str(device))
        manifest = load_manifest(cache)
        config = TrainConfig.model_validate({
            "student": {"preset": preset["student"], "dropout": 0.0},
            "loss": {"temperature": 2.0, "top_k": 8, "alpha": {"schedule": "constant", "start": 0.5}},
            "train": {"steps": 10_000, "micro_batch_size": preset["micro"], "eval_fraction": 0.0},
            "precision": args.precision,
        })
        selection = select_teachers(config, manifest)
        shards = {("teacher", "de"): manifest["shards"]}
        _build_vocabulary(cache, manifest, ["teacher"], shards, config, work / "vocab")
        alignment = Alignment.load(work / "vocab", ["teacher"])
        sampler = _sampler(cache, manifest, selection, shards, alignment, config)

        # Parquet reading alone: every shard loaded and every row mapped, as the streams do.
        started, positions = time.perf_counter(), 0
        for shard in manifest["shards"]:
            rows = ShardRows(cache / shard["path"], 8, manifest["top_k"])
            for index in range(len(rows.input_offsets) - 1):
                input_ids, where, labels, ids, logprobs = rows.row(index)
                alignment.input_map("teacher")[input_ids], alignment.id_maps["teacher"][ids]
                positions += len(where)
        read_rate = positions / (time.perf_counter() - started)

        init_distributed(device)
        import deepspeed

        student = build_student(config.student, len(alignment.tokens), manifest["max_length"], seed=0)
        engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                          config=deepspeed_config(config, args.precision, device))
        languages = ["de"]
        count = args.steps + 2
        cached_examples = [sampler.draw(preset["micro"]) for _ in range(count)]

        def cache_step(_):
            examples = sampler.draw(preset["micro"])  # the real path: read, map, then KD + MLM
            micro_batch_backward(engine, examples, languages, 0.5, config.loss, 1.0 / 1000, StepTotals.zeros(1))
            engine.step()

        def mlm_step(batch):
            logits = engine(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"])
            engine.backward(mlm_loss(logits, batch["labels"]).mean())
            engine.step()

        in_memory = [{k: v.to(device) for k, v in collate(e, languages).items()} for e in cached_examples]
        info, _ = inspect_teacher(TeacherSpec(name="teacher", model=str(work / "teacher"), languages=["de"]), 8, 128)
        teacher = Teacher(info, device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
        raw = ShardRows(cache / manifest["shards"][0]["path"], 8, manifest["top_k"])
        input_map, target_map = torch.from_numpy(alignment.input_map("teacher")), torch.from_numpy(alignment.id_maps["teacher"].astype("int64"))

        def online_step(batch):
            # The teacher sees its own ids; its top-k are mapped into the student vocabulary like cached ones.
            teacher_ids = batch["teacher_input_ids"]
            values, ids = teacher.top_k(teacher_ids, batch["attention_mask"], batch["rows"], batch["cols"], 8)
            logits = engine(input_map.to(device)[teacher_ids.to(device)], batch["attention_mask"], batch["rows"], batch["cols"])
            kd = kd_loss(logits, target_map.to(device)[ids.to(device).long()], values.to(device), 2.0)
            mlm = mlm_loss(logits, input_map.to(device)[batch["teacher_labels"].to(device)])
            engine.backward((0.5 * kd + 0.5 * mlm).mean())
            engine.step()

        online_batches = []
        for step_index in range(count):
            rows = [raw.row((step_index * preset["micro"] + i) % (len(raw.input_offsets) - 1)) for i in range(preset["micro"])]
            longest = max(len(r[0]) for r in rows)
            teacher_ids = torch.full((len(rows), longest), teacher.pad_id, dtype=torch.long)
            mask = torch.zeros_like(teacher_ids)
            row_index, col_index, labels = [], [], []
            for i, (ids, where, lab, _, _) in enumerate(rows):
                teacher_ids[i, : len(ids)] = torch.from_numpy(ids.astype("int64"))
                mask[i, : len(ids)] = 1
                row_index += [i] * len(where)
                col_index += where.tolist()
                labels += lab.tolist()
            online_batches.append({"teacher_input_ids": teacher_ids, "attention_mask": mask, "rows": torch.tensor(row_index),
                                   "cols": torch.tensor(col_index), "teacher_labels": torch.tensor(labels)})

        seconds_mlm = time_steps(mlm_step, in_memory)
        seconds_cache = time_steps(cache_step, list(range(count)))
        seconds_online = time_steps(online_step, online_batches)
        positions_per_step = sum(len(e.positions) for e in cached_examples[-1])

    figures = {
        "preset": args.preset, "device": str(device), "precision": args.precision,
        "student_vocabulary": len(alignment.tokens), "micro_batch_size": preset["micro"],
        "step_seconds_mlm": seconds_mlm, "step_seconds_cache": seconds_cache, "step_seconds_online": seconds_online,
        "cache_over_mlm": seconds_cache / seconds_mlm, "online_over_cache": seconds_online / seconds_cache,
        "read_positions_per_second": read_rate, "positions_per_step": positions_per_step,
        "positions_consumed_per_second": positions_per_step / seconds_cache, "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    print(f"step time: plain MLM {seconds_mlm * 1e3:.1f} ms, from the cache {seconds_cache * 1e3:.1f} ms, "
          f"online teacher {seconds_online * 1e3:.1f} ms")
    print(f"cache / MLM = {figures['cache_over_mlm']:.3f} (goal <= 1.10); online / cache = {figures['online_over_cache']:.2f}")
    print(f"Parquet reading: {read_rate:,.0f} masked positions/s; a step consumes {figures['positions_consumed_per_second']:,.0f}/s")
    print(f"peak RSS {figures['peak_rss_mb']:.0f} MB")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
