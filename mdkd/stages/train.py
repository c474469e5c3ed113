"""`mdkd train`: build the merged vocabulary from the cache and train the student with DeepSpeed on cached soft targets.

Recipe: setup (plan the run against the cache, check the shards it reads, claim the run folder and write what
the run is told to do: config, teacher selection, held-out documents, merged vocabulary), then fit (step by step,
checkpointing the data position with the model), then save (export the student as an HF folder, and only then
mark the run complete). No teacher weights are loaded: every ablation of teacher choice, k', tau, alpha or
student size reruns from the same cache.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from mdkd import __version__
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.config import TrainConfig, load_train_config
from mdkd.pipeline.distill.deepspeed_setup import init_distributed, resolve_precision
from mdkd.pipeline.distill.inherit import body_problems
from mdkd.pipeline.distill.metrics import AllLoggers, MetricsLogger
from mdkd.pipeline.distill.model_card import write_model_card
from mdkd.pipeline.distill.plan import RunPlan, plan_run
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distill.trackers import Trackers, require_packages
from mdkd.pipeline.distill.trainer import Distiller
from mdkd.pipeline.distill.vocab import Alignment, TeacherVocabulary, TokenTally, build_alignment, teacher_token_shares
from mdkd.pipeline.distributed import Ranks, barrier, pick_device
from mdkd.pipeline.errors import UserError


def run(
    config_path: Path, cache_dir: Path | str, out_dir: Path, resume: str | None = None, overwrite: bool = False
) -> dict:
    """Train (or finish training) the student described by `config_path` into `out_dir`; return the run's record."""
    ranks = Ranks.from_env()
    config = load_train_config(config_path)
    require_packages(config.trackers)
    cache = CacheReader(cache_dir)

    # Setup: everything that can be wrong with the inputs is found before any training starts.
    plan = plan_run(config, cache.manifest)
    # A student that inherits a teacher's weights: that teacher must be the one stage one cached.
    problems = body_problems(config.student, cache.manifest)
    if problems:
        raise UserError("; ".join(problems))
    # Every file the run reads, checked now (sizes, hashes, tokenizer copies): not hours into training.
    cache.require_intact(plan.shards, plan.teachers, progress=_progress_bar(ranks, "checking cache"))
    identity = {"config_hash": config.content_hash(), "cache": cache.manifest.identity}
    device = pick_device("auto", ranks)
    precision = resolve_precision(config.precision, device)
    init_distributed(device)
    run_folder = RunFolder.open(out_dir, ranks)  # a run on a store: its objects downloaded into the working copy

    def start(_claim) -> None:
        # What the run is told to do, written before it trains (a resumed run keeps its vocabulary and record).
        run_folder.write_config(config, config_path, identity, cache.dir)
        if not run_folder.is_run():
            run_folder.write_record(identity, complete=False, cache_dir=cache.dir)
        run_folder.write_teachers(plan.selection)
        _build_vocabulary(cache, plan, config, run_folder.vocab_dir)
        run_folder.write_held_out(config.train.eval_fraction, (d for s in plan.shards for d in cache.doc_ids(s)))

    claim = run_folder.claim(identity, ranks, resume=resume, overwrite=overwrite, start=start)
    if claim.action == "complete":
        ranks.echo(f"run {out_dir} is already complete; nothing to do")
        return claim.record
    alignment = Alignment.load(run_folder.vocab_dir, plan.teachers)
    distiller = Distiller(config, cache, plan, alignment, run_folder, ranks, device, precision)
    if distiller.inheritance is not None and ranks.is_main:
        run_folder.write_inheritance(distiller.inheritance)
        rows = ", ".join(f"{count} {path}" for path, count in distiller.inheritance["rows"].items())
        ranks.echo(
            f"student inherits {config.student.init.teacher} ({len(distiller.inheritance['layers'])} layers); "
            f"vocabulary rows: {rows}"
        )
    if resume:
        distiller.resume(resume)

    # Run: metrics.jsonl first, then any trackers (opened on rank 0 once the step a resume continues from is known).
    loggers: list[MetricsLogger] = [run_folder.metrics]
    if ranks.is_main and config.trackers.report_to:
        folder, name = run_folder.trackers_dir(config.trackers.dir), run_folder.title
        loggers.append(Trackers(config.trackers, folder, name, config.model_dump(mode="json"), distiller.step))
    distiller.fit(AllLoggers(loggers))

    # Save: the student as an HF folder with its model card, then the record that says the run is complete.
    distiller.export(alignment)
    if ranks.is_main:
        write_model_card(run_folder, cache.manifest)
        run_folder.write_record(
            identity, complete=True, cache_dir=cache.dir, steps=config.train.steps, mdkd_version=__version__
        )
        run_folder.sync()
        ranks.echo(f"student written to {run_folder.student_dir}")
    barrier(ranks)
    return run_folder.record()


def _progress_bar(ranks: Ranks, description: str):
    return lambda items: tqdm(items, desc=description, unit="shard", leave=False, disable=not ranks.progress_enabled())


def _build_vocabulary(cache: CacheReader, plan: RunPlan, config: TrainConfig, folder: Path) -> None:
    """The merged vocabulary over the teachers this run uses (kept as is when resuming). With a size cap, the
    cached inputs rank the tokens, and the stats say where each teacher's inputs and top-k mass land."""
    if Alignment.saved_in(folder):
        return
    vocabularies = [TeacherVocabulary.from_cache(cache, name) for name in plan.teachers]
    if config.vocab.max_size is None:
        alignment = build_alignment(vocabularies)
    else:
        tallies = {
            v.name: TokenTally.from_cache(cache, [s for s in plan.shards if s.teacher == v.name], len(v.canonical))
            for v in vocabularies
        }
        frequencies = {v.name: tallies[v.name].canonical_counts(v.canonical) for v in vocabularies}
        alignment = build_alignment(vocabularies, frequencies, config.vocab.max_size)
        alignment.stats["token_shares"] = {
            name: teacher_token_shares(alignment, name, tally) for name, tally in tallies.items()
        }
    alignment.save(folder)
