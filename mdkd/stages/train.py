"""`mdkd train`: build the merged vocabulary from the cache and train the student with DeepSpeed on cached soft targets.

Recipe: check the config against the cache (teachers, languages, k'), check the shards it uses, claim the run
folder, build the vocabulary alignment, then train step by step (checkpointing the data position with the
model), and finally export the student as an HF folder. No teacher weights are loaded: every ablation of
teacher choice, k', tau, alpha or student size reruns from the same cache.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mdkd import __version__
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distill.data import Sampler, Stream, held_out, language_probabilities
from mdkd.pipeline.distill.deepspeed_setup import deepspeed_config, init_distributed, linear_schedule, resolve_precision
from mdkd.pipeline.distributed import Ranks, barrier, pick_device
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.evaluation import MetricSums, fraction_rule, held_out_windows, score_windows
from mdkd.pipeline.distill.losses import alpha_at
from mdkd.pipeline.cache.manifest import load_manifest, write_json_atomic
from mdkd.pipeline.cache.shards import check_shard_file, read_shard
from mdkd.pipeline.distill.student import build_student, export_student
from mdkd.pipeline.distill.config import TrainConfig, load_train_config, teacher_weights
from mdkd.pipeline.distill.training import StepTotals, micro_batch_backward, rank_micro_batches
from mdkd.pipeline.distill.vocab import Alignment, TeacherVocabulary, build_alignment, count_cached_tokens, mass_dropped

RUN_FILE = "run.json"


def run(config_path: Path, cache_dir: Path, out_dir: Path, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train (or finish training) the student described by `config_path` into `out_dir`; return run.json."""
    ranks = Ranks.from_env()
    config = load_train_config(config_path)
    manifest = load_manifest(cache_dir)

    # Setup: everything that can be wrong with the inputs is found before any training starts.
    selection = select_teachers(config, manifest)
    shards = {(t, l): [s for s in manifest["shards"] if s["teacher"] == t and s["language"] == l]
              for l, weights in selection.items() for t in weights}
    teachers = [t for t in manifest["teachers"] if any(t == name for name, _ in shards)]  # in cache order
    _check_shards(cache_dir, [s for group in shards.values() for s in group], ranks)
    identity = {"config_hash": config.content_hash(), "cache_config_hash": manifest["config_hash"]}
    device = pick_device("auto", ranks)
    precision = resolve_precision(config.precision, device)
    init_distributed(device)
    # Every rank reads the run folder's state before rank 0 changes it (an --overwrite deletes it).
    status = _run_status(out_dir, identity, resume, overwrite)
    barrier(ranks)
    if status.get("complete"):
        ranks.echo(f"run {out_dir} is already complete; nothing to do")
        return status
    if ranks.is_main:
        if overwrite and (out_dir / RUN_FILE).exists() and not resume:
            shutil.rmtree(out_dir)
        _write_run_files(out_dir, config, config_path, cache_dir, identity)
        _build_vocabulary(cache_dir, manifest, teachers, shards, config, out_dir / "vocab")
        _record_held_out(cache_dir, shards, config.train.eval_fraction, out_dir / "heldout.json")
    barrier(ranks)
    alignment = Alignment.load(out_dir / "vocab", teachers)
    sampler = _sampler(cache_dir, manifest, selection, shards, alignment, config)

    # Run.
    import deepspeed

    student = build_student(config.student, len(alignment.tokens), manifest["max_length"], config.train.seed)
    ds_config = deepspeed_config(config, precision, device)
    schedule = None
    if "scheduler" not in ds_config:
        warmup = int(round(config.train.warmup * config.train.steps))
        schedule = lambda optimizer: linear_schedule(optimizer, warmup, config.train.steps)  # noqa: E731
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=ds_config,
                                      lr_scheduler=schedule)
    checkpoints = out_dir / "checkpoints"
    start = _resume(engine, sampler, checkpoints, resume, identity) if resume else 0
    held_out_sets = _held_out_sets(cache_dir, manifest, shards, alignment, config)
    _train(engine, sampler, config, out_dir, ranks, start, checkpoints, identity, held_out_sets)

    # Save: the student as an HF folder, then the marker that says the run is complete.
    _export(engine, alignment, out_dir / "student", ranks)
    status = {**identity, "complete": True, "steps": config.train.steps, "cache": str(cache_dir.resolve()),
              "mdkd_version": __version__}
    if ranks.is_main:
        write_json_atomic(out_dir / RUN_FILE, status)
        ranks.echo(f"student written to {out_dir / 'student'}")
    barrier(ranks)
    return status


def select_teachers(config: TrainConfig, manifest: dict) -> dict[str, dict[str, float]]:
    """{language: {teacher: weight}} from the config, or every teacher that cached each language."""
    cached: dict[str, list[str]] = {}
    for name, teacher in manifest["teachers"].items():
        for language in teacher["languages"]:
            cached.setdefault(language, []).append(name)
    problems = []
    if config.teachers is None:
        selection = {language: {name: 1.0 for name in names} for language, names in cached.items()}
    else:
        selection = {language: teacher_weights(choice) for language, choice in config.teachers.items()}
    for language, weights in selection.items():
        if language not in cached:
            problems.append(f"language '{language}' is not in the cache (cached: {', '.join(cached)})")
            continue
        for name in weights:
            if name not in manifest["teachers"]:
                problems.append(f"teacher '{name}' is not in the cache (cached: {', '.join(manifest['teachers'])})")
            elif name not in cached[language]:
                problems.append(f"teacher '{name}' did not cache language '{language}' (it cached {', '.join(manifest['teachers'][name]['languages'])})")
    if config.loss.top_k > manifest["top_k"]:
        problems.append(f"loss.top_k {config.loss.top_k} is above the cached top_k {manifest['top_k']} (lower loss.top_k)")
    if problems:
        raise UserError("; ".join(problems))
    return selection


def _check_shards(cache_dir: Path, shards: list[dict], ranks: Ranks) -> None:
    """Size and sha256 of every shard the run reads: a damaged cache fails now, not hours into training."""
    for shard in tqdm(shards, desc="checking cache", unit="shard", leave=False, disable=not ranks.progress_enabled()):
        problem = check_shard_file(cache_dir, shard)
        if problem:
            raise UserError(f"cache {cache_dir} fails verification: {problem} (run `mdkd cache verify`, then rebuild)")


def _run_status(out_dir: Path, identity: dict, resume: str | None, overwrite: bool) -> dict:
    """The run's status: complete, resumable, or new. Refuses a folder that holds another run or other files."""
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        status = json.loads(run_file.read_text(encoding="utf-8"))
        same = all(status.get(k) == v for k, v in identity.items())
        if same and (status.get("complete") or resume):
            return status
        if not overwrite:
            if not same:
                raise UserError(f"{out_dir} holds a run with a different config or cache (choose another --out, or pass --overwrite)")
            raise UserError(f"{out_dir} holds an unfinished run of this config (pass --resume auto to continue it, or --overwrite to restart)")
    elif resume:
        raise UserError(f"nothing to resume in {out_dir}: it holds no run (drop --resume to start one)")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty and is not an mdkd run (choose an empty or new --out folder)")
    return {}


def _write_run_files(out_dir: Path, config: TrainConfig, config_path: Path, cache_dir: Path, identity: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"# mdkd train config (resolved from {config_path}); hash {identity['config_hash']}\n# cache: {cache_dir.resolve()}\n"
    (out_dir / "config.yaml").write_text(header + dump_config(config), encoding="utf-8")
    if not (out_dir / RUN_FILE).exists():
        write_json_atomic(out_dir / RUN_FILE, {**identity, "complete": False, "cache": str(cache_dir.resolve())})


def _build_vocabulary(cache_dir: Path, manifest: dict, teachers: list[str], shards, config: TrainConfig, folder: Path) -> None:
    """The merged vocabulary over the teachers this run uses (kept as is when resuming)."""
    if (folder / "stats.json").exists():
        return
    vocabularies = [TeacherVocabulary.from_cache(cache_dir, name, manifest["teachers"][name]) for name in teachers]
    own_shards = {name: [s for (t, _), group in shards.items() if t == name for s in group] for name in teachers}
    capped = config.vocab.max_size is not None
    frequencies = {v.name: count_cached_tokens(cache_dir, own_shards[v.name], v.canonical) for v in vocabularies} if capped else None
    alignment = build_alignment(vocabularies, frequencies, config.vocab.max_size)
    alignment.stats["lowercase"] = all(v.family.lowercase for v in vocabularies)
    alignment.stats["mass_dropped"] = {
        v.name: mass_dropped(cache_dir, own_shards[v.name], alignment.id_maps[v.name], manifest["top_k"]) if capped else 0.0
        for v in vocabularies
    }
    alignment.save(folder)


def _record_held_out(cache_dir: Path, shards, fraction: float, path: Path) -> None:
    documents = set()
    for group in shards.values():
        for shard in group:
            doc_ids = read_shard(cache_dir / shard["path"], ["doc_id"]).column("doc_id").to_pylist()
            documents.update(doc_id for doc_id in doc_ids if held_out(doc_id, fraction))
    write_json_atomic(path, {"eval_fraction": fraction, "rule": "blake2b-64(doc_id) / 2^64 < eval_fraction",
                             "documents": sorted(documents)})


def _sampler(cache_dir: Path, manifest: dict, selection, shards, alignment: Alignment, config: TrainConfig) -> Sampler:
    streams = {}
    for (teacher, language), group in shards.items():
        stream = Stream(cache_dir, teacher, language, group, config.train.seed, config.train.eval_fraction,
                        config.loss.top_k, manifest["top_k"], alignment.input_map(teacher), alignment.id_maps[teacher])
        streams[stream.key] = stream
    sizes = {}
    for entry in manifest["corpus"]:
        if entry["language"] in selection:
            sizes[entry["language"]] = sizes.get(entry["language"], 0) + entry["documents"]
    for stream in streams.values():
        if not any(len(stream.training_rows(i)) for i in range(len(stream.shards))):
            raise UserError(f"every document of {stream.key} is held out (lower train.eval_fraction)")
    probabilities = language_probabilities(sizes, config.language_sampling)
    return Sampler(streams, probabilities, selection, config.train.seed)


def _resume(engine, sampler: Sampler, checkpoints: Path, resume: str, identity: dict) -> int:
    """Load the checkpoint named by --resume (auto: the latest); return the step to continue from."""
    if resume == "auto":
        load_dir, tag = checkpoints, None
        if not (checkpoints / "latest").exists():
            return 0  # the run stopped before its first checkpoint: start over, same data and seed
    else:
        path = Path(resume)
        load_dir, tag = path.parent, path.name
        if not path.is_dir():
            raise UserError(f"checkpoint {path} does not exist (give a folder under RUN/checkpoints or 'auto')")
    _, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if client is None or client.get("config_hash") != identity["config_hash"]:
        raise UserError(f"checkpoint in {load_dir} was written by a different config (start a new run instead)")
    sampler.restore(client["sampler"])
    return int(client["step"])


def _held_out_sets(cache_dir: Path, manifest: dict, shards, alignment: Alignment, config: TrainConfig) -> list:
    """The held-out windows scored during training: up to eval_rows per (teacher, language), fixed for the run."""
    rule = fraction_rule(config.train.eval_fraction)
    sets = []
    for teacher, language in shards:
        windows = held_out_windows(cache_dir, manifest, teacher, language, rule, config.train.eval_rows, config.loss.top_k)
        if windows.rows:
            sets.append((windows, alignment.input_map(teacher), alignment.id_maps[teacher]))
    return sets


def _evaluate(engine, held_out_sets: list, step: int) -> dict:
    """Held-out metrics per language (every rank runs the same forwards, as ZeRO-3 needs all of them)."""
    per_language: dict[str, MetricSums] = {}
    engine.eval()
    for windows, input_map, target_map in held_out_sets:
        model, _ = score_windows(lambda *batch: engine(*(t.to(engine.device) for t in batch)), windows, input_map, target_map)
        per_language.setdefault(windows.language, MetricSums()).add(model)
    engine.train()
    return {"step": step, "split": "heldout", "per_language": {l: m.result() for l, m in per_language.items()}}


def _train(engine, sampler: Sampler, config: TrainConfig, out_dir: Path, ranks: Ranks, start: int, checkpoints: Path,
           identity: dict, held_out_sets: list) -> None:
    loop, world = config.train, ranks.world_size
    languages = sampler.languages
    metrics_path = out_dir / "metrics.jsonl"
    if ranks.is_main:
        _truncate_metrics(metrics_path, start)
    progress = tqdm(total=loop.steps, initial=start, desc="training", unit="step", disable=not ranks.progress_enabled())
    for step in range(start, loop.steps):
        started = time.perf_counter()
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run replays the same masks.
        torch.manual_seed(loop.seed * 1_000_003 + step * 1009 + ranks.rank)
        alpha = alpha_at(step, config.loss.alpha, loop.steps)
        examples = sampler.draw(loop.micro_batch_size * loop.gradient_accumulation * world)
        positions = sum(len(e.positions) for e in examples)
        scale = world * loop.gradient_accumulation / max(positions, 1)
        lr = engine.optimizer.param_groups[0]["lr"]  # what this step applies
        totals = StepTotals.zeros(len(languages))
        for micro in rank_micro_batches(examples, ranks.rank, world, loop.micro_batch_size, loop.gradient_accumulation):
            micro_batch_backward(engine, micro, languages, alpha, config.loss, scale, totals)
            engine.step()
        totals.all_reduce()
        seconds = time.perf_counter() - started
        record = {"step": step + 1, "split": "train", "lr": lr, "alpha": alpha, **totals.metrics(languages),
                  "tokens_per_second": totals.tokens.item() / seconds}
        records = [record]
        if held_out_sets and ((step + 1) % (loop.eval_every or loop.checkpoint_every) == 0 or step + 1 == loop.steps):
            records.append(_evaluate(engine, held_out_sets, step + 1))
        if ranks.is_main:
            with metrics_path.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in records)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            progress.update(1)
        if (step + 1) % loop.checkpoint_every == 0 or step + 1 == loop.steps:
            client = {"step": step + 1, "sampler": sampler.state(), "config_hash": identity["config_hash"]}
            engine.save_checkpoint(str(checkpoints), tag=f"step-{step + 1:07d}", client_state=client)
    progress.close()


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop lines past the step a resumed run continues from, so every step is logged once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= start]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _export(engine, alignment: Alignment, folder: Path, ranks: Ranks) -> None:
    """Rank 0 saves the student; under ZeRO-3 the partitioned weights are gathered first."""
    import deepspeed

    student = engine.module
    parameters = list(student.parameters())
    gathered = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if engine.zero_optimization_partition_weights() else None
    with gathered if gathered is not None else torch.no_grad():
        if ranks.is_main:
            export_student(student, alignment.tokens, bool(alignment.stats.get("lowercase")), folder)
    barrier(ranks)

