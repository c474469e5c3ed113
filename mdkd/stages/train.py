"""`mdkd train`: build the merged vocabulary from the cache and train the student with DeepSpeed on cached soft targets.

Recipe: check the config against the cache (teachers, languages, k'), check the shards it uses, claim the run
folder, build the vocabulary alignment, then train step by step (checkpointing the data position with the
model), and finally export the student as an HF folder. No teacher weights are loaded: every ablation of
teacher choice, k', tau, alpha or student size reruns from the same cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mdkd import __version__
from mdkd.pipeline.cache.documents import HELD_OUT_FILE, fraction_rule, save_held_out
from mdkd.pipeline.cache.manifest import Manifest, ShardEntry
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distill.config import TrainConfig, load_train_config, teacher_weights
from mdkd.pipeline.distill.data import Sampler, Stream, language_probabilities
from mdkd.pipeline.distill.deepspeed_setup import deepspeed_config, init_distributed, linear_schedule, resolve_precision
from mdkd.pipeline.distill.losses import alpha_at
from mdkd.pipeline.distill.student import build_student, export_student
from mdkd.pipeline.distill.training import StepTotals, micro_batch_backward, rank_micro_batches
from mdkd.pipeline.distill.vocab import Alignment, TeacherVocabulary, TokenTally, build_alignment, teacher_token_shares
from mdkd.pipeline.distributed import Ranks, barrier, pick_device, transformers_console
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.evaluation import MetricSums, held_out_windows, score_windows
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.run_folder import claim_folder, prepare_folder

RUN_FILE = "run.json"


def run(config_path: Path, cache_dir: Path, out_dir: Path, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train (or finish training) the student described by `config_path` into `out_dir`; return run.json."""
    ranks = Ranks.from_env()
    config = load_train_config(config_path)
    cache = CacheReader(cache_dir)

    # Setup: everything that can be wrong with the inputs is found before any training starts.
    selection = select_teachers(config, cache.manifest)
    pairs = [(t, language) for language, weights in selection.items() for t in weights]
    teachers = [t for t in cache.manifest.teachers if any(t == name for name, _ in pairs)]  # in cache order
    shards = [s for t, language in pairs for s in cache.manifest.shards_of(t, language)]  # every shard the run reads
    _check_shards(cache, shards, ranks)
    identity = {"config_hash": config.content_hash(), "cache": cache.manifest.identity}
    device = pick_device("auto", ranks)
    precision = resolve_precision(config.precision, device)
    init_distributed(device)
    # Every rank reads the run folder's state before rank 0 changes it (an --overwrite deletes it).
    claim = claim_folder(
        out_dir,
        RUN_FILE,
        identity,
        what="run",
        overwrite=overwrite and not resume,
        resume=resume is not None,
        resume_hint="pass --resume auto to continue it",
    )
    barrier(ranks)
    if claim.action == "complete":
        ranks.echo(f"run {out_dir} is already complete; nothing to do")
        return claim.record
    if resume and claim.action == "new":
        raise UserError(f"nothing to resume in {out_dir}: it holds no run (drop --resume to start one)")
    if ranks.is_main:
        prepare_folder(claim)
        _write_run_files(out_dir, config, config_path, cache.dir, identity)
        _build_vocabulary(cache, teachers, shards, config, out_dir / "vocab")
        save_held_out(
            out_dir / HELD_OUT_FILE, config.train.eval_fraction, (d for s in shards for d in cache.doc_ids(s))
        )
    barrier(ranks)
    alignment = Alignment.load(out_dir / "vocab", teachers)
    sampler = _sampler(cache, selection, pairs, alignment, config)

    # Run.
    import deepspeed

    student = build_student(config.student, len(alignment.tokens), cache.manifest.max_length, config.train.seed)
    ds_config = deepspeed_config(config, precision, device)
    schedule = None
    if "scheduler" not in ds_config:
        warmup = int(round(config.train.warmup * config.train.steps))
        schedule = lambda optimizer: linear_schedule(optimizer, warmup, config.train.steps)  # noqa: E731
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=ds_config, lr_scheduler=schedule
    )
    checkpoints = out_dir / "checkpoints"
    start = _resume(engine, sampler, checkpoints, resume, identity) if resume else 0
    held_out_sets = _held_out_sets(cache, pairs, alignment, config)
    # Held-out scoring reports the student's top-k mass at the loss's temperature when the cache can give the
    # teacher's to hold it against.
    eval_temperatures = [config.loss.temperature] if config.loss.temperature in cache.manifest.temperatures else []
    _train(engine, sampler, config, out_dir, ranks, start, checkpoints, identity, held_out_sets, eval_temperatures)

    # Save: the student as an HF folder, then the record that says the run is complete.
    _export(engine, alignment, out_dir / "student", ranks)
    status = {
        "identity": identity,
        "complete": True,
        "steps": config.train.steps,
        "cache": str(cache.dir.resolve()),
        "mdkd_version": __version__,
    }
    if ranks.is_main:
        write_json_atomic(out_dir / RUN_FILE, status)
        ranks.echo(f"student written to {out_dir / 'student'}")
    barrier(ranks)
    return status


def select_teachers(config: TrainConfig, manifest: Manifest) -> dict[str, dict[str, float]]:
    """{language: {teacher: weight}} from the config, or every teacher that cached each language; a UserError
    listing every way the config does not fit the cache."""
    selection, problems = plan_against_cache(config, manifest)
    if problems:
        raise UserError("; ".join(problems))
    return selection


def plan_against_cache(config: TrainConfig, manifest: Manifest) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The teacher selection, and the problems of the config against the cache (teachers, languages, k', tau)."""
    cached = manifest.languages()
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
            if name not in manifest.teachers:
                problems.append(f"teacher '{name}' is not in the cache (cached: {', '.join(manifest.teachers)})")
            elif name not in cached[language]:
                problems.append(
                    f"teacher '{name}' did not cache language '{language}' "
                    f"(it cached {', '.join(manifest.teachers[name].languages)})"
                )
    if config.loss.top_k > manifest.top_k:
        problems.append(f"loss.top_k {config.loss.top_k} is above the cached top_k {manifest.top_k} (lower loss.top_k)")
    problems.extend(temperature_problems(config, manifest))
    return selection, problems


def temperature_problems(config: TrainConfig, manifest: Manifest) -> list[str]:
    """`rest` needs the teacher's tempered log-partition at the loss's temperature, which only stage one can
    record: a cache without it (schema 1) or without that temperature cannot serve the loss."""
    if config.loss.missing_mass != "rest":
        return []
    if not manifest.temperatures:
        return [
            f"loss.missing_mass 'rest' needs the tempered log-partitions that this schema-{manifest.schema_version} "
            "cache lacks (rebuild the cache with this mdkd, or set loss.missing_mass: renormalize)"
        ]
    if config.loss.temperature not in manifest.temperatures:
        recorded = ", ".join(f"{tau:g}" for tau in manifest.temperatures)
        return [
            f"loss.temperature {config.loss.temperature:g} was not recorded in the cache (it has {recorded}; "
            "use one of them, or add it to the cache config's temperatures and rebuild)"
        ]
    return []


def _check_shards(cache: CacheReader, shards: list[ShardEntry], ranks: Ranks) -> None:
    """Size and sha256 of every shard the run reads: a damaged cache fails now, not hours into training."""
    for shard in tqdm(shards, desc="checking cache", unit="shard", leave=False, disable=not ranks.progress_enabled()):
        problem = cache.check_file(shard)
        if problem:
            raise UserError(f"cache {cache.dir} fails verification: {problem} (run `mdkd cache verify`, then rebuild)")


def _write_run_files(out_dir: Path, config: TrainConfig, config_path: Path, cache_dir: Path, identity: dict) -> None:
    header = (
        f"# mdkd train config (resolved from {config_path}); hash {identity['config_hash']}\n"
        f"# cache: {cache_dir.resolve()}\n"
    )
    (out_dir / "config.yaml").write_text(header + dump_config(config), encoding="utf-8")
    if not (out_dir / RUN_FILE).exists():
        write_json_atomic(
            out_dir / RUN_FILE, {"identity": identity, "complete": False, "cache": str(cache_dir.resolve())}
        )


def _build_vocabulary(
    cache: CacheReader, teachers: list[str], shards: list[ShardEntry], config: TrainConfig, folder: Path
) -> None:
    """The merged vocabulary over the teachers this run uses (kept as is when resuming). With a size cap, the
    cached inputs rank the tokens, and the stats say where each teacher's inputs and top-k mass land."""
    if (folder / "stats.json").exists():
        return
    vocabularies = [TeacherVocabulary.from_cache(cache, name) for name in teachers]
    if config.vocab.max_size is None:
        alignment = build_alignment(vocabularies)
    else:
        tallies = {
            v.name: TokenTally.from_cache(cache, [s for s in shards if s.teacher == v.name], len(v.canonical))
            for v in vocabularies
        }
        frequencies = {v.name: tallies[v.name].canonical_counts(v.canonical) for v in vocabularies}
        alignment = build_alignment(vocabularies, frequencies, config.vocab.max_size)
        alignment.stats["token_shares"] = {
            name: teacher_token_shares(alignment, name, tally) for name, tally in tallies.items()
        }
    alignment.save(folder)


def _sampler(cache: CacheReader, selection, pairs, alignment: Alignment, config: TrainConfig) -> Sampler:
    streams = {}
    for teacher, language in pairs:
        stream = Stream(
            cache,
            teacher,
            language,
            config.train.seed,
            config.train.eval_fraction,
            config.loss.top_k,
            _temperature_column(config, cache.manifest),
            alignment.input_map(teacher),
            alignment.id_maps[teacher],
        )
        streams[stream.key] = stream
    for stream in streams.values():
        if not any(len(stream.training_rows(i)) for i in range(len(stream.shards))):
            raise UserError(f"every document of {stream.key} is held out (lower train.eval_fraction)")
    sizes = {language: cache.manifest.documents(language) for language in selection}
    probabilities = language_probabilities(sizes, config.language_sampling)
    return Sampler(streams, probabilities, selection, config.train.seed)


def _temperature_column(config: TrainConfig, manifest: Manifest) -> int | None:
    """Which cached log-partition the loss reads (none for `renormalize`)."""
    return manifest.temperatures.index(config.loss.temperature) if config.loss.missing_mass == "rest" else None


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


def _held_out_sets(cache: CacheReader, pairs, alignment: Alignment, config: TrainConfig) -> list:
    """The held-out windows scored during training: up to eval_rows per (teacher, language), fixed for the run."""
    rule = fraction_rule(config.train.eval_fraction)
    sets = []
    for teacher, language in pairs:
        windows = held_out_windows(cache, teacher, language, rule, config.train.eval_rows, config.loss.top_k)
        if windows.rows:
            sets.append((windows, alignment.input_map(teacher), alignment.id_maps[teacher]))
    return sets


def _evaluate(engine, held_out_sets: list, temperatures: list[float], step: int) -> dict:
    """Held-out metrics per language, and per (language, teacher) windows so that two runs can be compared on
    the windows they share (every rank runs the same forwards, as ZeRO-3 needs all of them)."""
    per_language: dict[str, MetricSums] = {}
    per_window: dict[str, dict] = {}
    engine.eval()
    for windows, input_map, target_map in held_out_sets:
        model, _ = score_windows(
            lambda *batch: engine(*(t.to(engine.device) for t in batch)), windows, input_map, target_map, temperatures
        )
        per_language.setdefault(windows.language, MetricSums()).add(model)
        per_window[f"{windows.language}/{windows.teacher}"] = model.result()
    engine.train()
    return {
        "step": step,
        "split": "heldout",
        "per_language": {language: m.result() for language, m in per_language.items()},
        "per_window": per_window,
    }


def _train(
    engine,
    sampler: Sampler,
    config: TrainConfig,
    out_dir: Path,
    ranks: Ranks,
    start: int,
    checkpoints: Path,
    identity: dict,
    held_out_sets: list,
    eval_temperatures: list[float],
) -> None:
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
        record = {
            "step": step + 1,
            "split": "train",
            "lr": lr,
            "alpha": alpha,
            **totals.metrics(languages),
            "tokens_per_second": totals.tokens.item() / seconds,
        }
        records = [record]
        if held_out_sets and ((step + 1) % (loop.eval_every or loop.checkpoint_every) == 0 or step + 1 == loop.steps):
            records.append(_evaluate(engine, held_out_sets, eval_temperatures, step + 1))
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
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= start
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _export(engine, alignment: Alignment, folder: Path, ranks: Ranks) -> None:
    """Rank 0 saves the student; under ZeRO-3 the partitioned weights are gathered first."""
    import deepspeed

    student = engine.module
    parameters = list(student.parameters())
    gathered = (
        deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
        if engine.zero_optimization_partition_weights()
        else None
    )
    with gathered if gathered is not None else torch.no_grad():
        if ranks.is_main:
            with transformers_console(ranks):
                export_student(student, alignment.tokens, bool(alignment.stats.get("lowercase")), folder)
    barrier(ranks)
