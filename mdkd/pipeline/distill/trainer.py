"""The training loop and the state it carries, in one object: `Distiller`.

Its state is the DeepSpeed engine (student, optimizer, lr schedule), the sampler (the data position), the
held-out sets scored during training and the step; a checkpoint holds all of it (the engine's own files plus the
sampler state, the step and the config hash), so a resumed run continues exactly where the checkpoint left off.
What a resume trusts is in checkpoints.py.
Metrics go to the `MetricsLogger` that `fit` is given, on rank 0.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mdkd.pipeline.cache.documents import fraction_rule
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill import checkpoints
from mdkd.pipeline.distill.config import TrainConfig
from mdkd.pipeline.distill.data import Sampler, StepLoader, Stream, language_probabilities
from mdkd.pipeline.distill.deepspeed_setup import deepspeed_config, linear_schedule
from mdkd.pipeline.distill.losses import alpha_at
from mdkd.pipeline.distill.metrics import MetricsLogger
from mdkd.pipeline.distill.plan import RunPlan
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distill.student import export_student, initial_student
from mdkd.pipeline.distill.training import StepTotals, Supports, micro_batch_backward
from mdkd.pipeline.distill.vocab import Alignment
from mdkd.pipeline.distributed import Ranks, barrier, transformers_console
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.evaluation import MetricSums, held_out_windows, score_windows


class Distiller:
    """Train one student from one cache: `resume`, then `fit`, then `export`."""

    def __init__(
        self,
        config: TrainConfig,
        cache: CacheReader,
        plan: RunPlan,
        alignment: Alignment,
        run: RunFolder,
        ranks: Ranks,
        device: torch.device,
        precision: str,
    ):
        import deepspeed

        self.config, self.run, self.ranks = config, run, ranks
        self.config_hash = config.content_hash()
        self.sampler = build_sampler(cache, plan, alignment, config)
        self.supports = None
        if config.loss.missing_mass == "support":
            masks = torch.from_numpy(np.stack([alignment.support(name) for name in plan.teachers]))
            self.supports = Supports(plan.teachers, masks.to(device), plan.tail_temperature)
        student, self.inheritance = initial_student(config.student, alignment, cache, plan.shards, config.train.seed)
        ds_config = deepspeed_config(config, precision, device)
        schedule = None
        if "scheduler" not in ds_config:  # a raw `deepspeed: {scheduler: ...}` block brings its own
            warmup = int(round(config.train.warmup * config.train.steps))
            schedule = lambda optimizer: linear_schedule(optimizer, warmup, config.train.steps)  # noqa: E731
        self.engine, *_ = deepspeed.initialize(
            model=student, model_parameters=student.parameters(), config=ds_config, lr_scheduler=schedule
        )
        self.held_out = held_out_sets(cache, plan, alignment, config)
        # Held-out scoring reports the student's top-k mass at the loss's temperature when the cache can give the
        # teacher's to hold it against.
        self.eval_temperatures = (
            [config.loss.temperature] if config.loss.temperature in cache.manifest.temperatures else []
        )
        self.step = 0
        self.sampler_state = self.sampler.state()  # as of the last step taken (the loader draws ahead)

    # ---------------------------------------------------------------- checkpoints

    def resume(self, resume: str) -> None:
        """Load the checkpoint named by --resume (auto: the newest that mdkd wrote and that is intact, if any),
        then drop the metrics logged past it, so that every step is logged once. Nothing is loaded before its
        record checks out (`checkpoints.check`), and then as tensors and plain values only."""
        if resume == "auto":
            folder, passed_over = checkpoints.newest_valid(self.run.checkpoints_dir, self.config_hash)
            for problem in passed_over:
                self.ranks.echo(f"passed over: {problem}", err=True)
        else:
            folder = Path(resume)
            _, problem = checkpoints.check(folder, self.config_hash)
            if problem:
                raise UserError(f"{problem} (give a folder under RUN/checkpoints, or --resume auto)")
        if folder is not None:  # none: the run stopped before its first checkpoint, and starts over
            if not checkpoints.install_weights_only_loading(self.engine):
                self.ranks.echo("note: a custom DeepSpeed checkpoint engine loads this checkpoint", err=True)
            try:
                _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            except pickle.UnpicklingError as error:  # weights_only refused an object it may not build
                raise UserError(
                    f"checkpoint {folder} holds more than tensors and plain values, so mdkd does not load it "
                    f"({str(error).splitlines()[0]})"
                ) from None
            self.sampler.restore(client["sampler"])
            self.sampler_state = self.sampler.state()
            self.step = int(client["step"])
        if self.ranks.is_main:
            self.run.metrics.keep_until(self.step)

    def save_checkpoint(self) -> None:
        """Every rank writes its part; then rank 0 records what was written, last (`checkpoints.write_record`)."""
        # The loader draws ahead: the sampler's state after this step's examples is the one a resume needs.
        client = {"step": self.step, "sampler": self.sampler_state, "config_hash": self.config_hash}
        tag = checkpoints.tag_of(self.step)
        self.engine.save_checkpoint(str(self.run.checkpoints_dir), tag=tag, client_state=client)
        barrier(self.ranks)
        if self.ranks.is_main:
            checkpoints.write_record(self.run.checkpoints_dir / tag, self.config_hash, self.step)
            self.run.sync()

    # ---------------------------------------------------------------- the loop

    def fit(self, logger: MetricsLogger) -> None:
        """Train from the current step to the last one: log every step to `logger` (on rank 0), score the held-out
        sets every `eval_every` steps (and at the end), checkpoint every `checkpoint_every` steps (and at the
        end)."""
        loop = self.config.train
        progress = tqdm(
            total=loop.steps, initial=self.step, desc="training", unit="step", disable=not self.ranks.progress_enabled()
        )
        loader = StepLoader(
            self.sampler,
            loop.steps - self.step,
            loop.micro_batch_size,
            loop.gradient_accumulation,
            self.ranks.rank,
            self.ranks.world_size,
            None if self.supports is None else self.supports.teachers,
            pin_memory=self.engine.device.type == "cuda",
        )
        try:
            self._train_steps(loader, progress, logger)
        finally:
            loader.close()
        progress.close()
        if self.ranks.is_main:
            logger.close()

    def _train_steps(self, loader: StepLoader, progress, logger: MetricsLogger) -> None:
        loop = self.config.train
        while self.step < loop.steps:
            record = self.train_step(loader)
            records = [record]
            last = self.step == loop.steps
            if self.held_out and (self.step % (loop.eval_every or loop.checkpoint_every) == 0 or last):
                records.append(self.evaluate())
            if self.ranks.is_main:
                logger.log(records)
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
                progress.update(1)
            if self.step % loop.checkpoint_every == 0 or last:
                self.save_checkpoint()

    def train_step(self, loader: StepLoader) -> dict:
        """One optimizer step over micro_batch × accumulation × world examples (this rank's micro-batches come
        from `loader`); returns its `train` record. Its time includes any wait for the data."""
        loop, world, rank = self.config.train, self.ranks.world_size, self.ranks.rank
        started = time.perf_counter()
        data = loader.next()
        # Dropout draws from a generator seeded by (seed, step, rank): a resumed run replays the same masks.
        seed_device(loop.seed * 1_000_003 + self.step * 1009 + rank, self.engine.device)
        alpha = alpha_at(self.step, self.config.loss.alpha, loop.steps)
        languages = self.sampler.languages
        scale = world * loop.gradient_accumulation / max(data.positions, 1)
        lr = self.engine.optimizer.param_groups[0]["lr"]  # what this step applies
        totals = StepTotals.zeros(len(languages))
        for batch in data.micro_batches:
            micro_batch_backward(self.engine, batch, alpha, self.config.loss, scale, totals, self.supports)
            self.engine.step()
        totals.all_reduce()
        self.step += 1
        self.sampler_state = data.sampler_state
        return {
            "step": self.step,
            "split": "train",
            "lr": lr,
            "alpha": alpha,
            **totals.metrics(languages),
            "tokens_per_second": totals.tokens.item() / (time.perf_counter() - started),
        }

    def evaluate(self) -> dict:
        """Held-out metrics per language, and per (language, teacher) windows so that two runs can be compared on
        the windows they share (every rank runs the same forwards, as ZeRO-3 needs all of them)."""
        engine = self.engine
        per_language: dict[str, MetricSums] = {}
        per_window: dict[str, dict] = {}
        engine.eval()
        for windows, input_map, target_map in self.held_out:
            model, _ = score_windows(
                lambda *batch: engine(*(t.to(engine.device) for t in batch)),
                windows,
                input_map,
                target_map,
                self.eval_temperatures,
            )
            per_language.setdefault(windows.language, MetricSums()).add(model)
            per_window[f"{windows.language}/{windows.teacher}"] = model.result()
        engine.train()
        return {
            "step": self.step,
            "split": "heldout",
            "per_language": {language: m.result() for language, m in per_language.items()},
            "per_window": per_window,
        }

    # ---------------------------------------------------------------- the student

    def export(self, alignment: Alignment) -> None:
        """Rank 0 saves the student into the run folder; under ZeRO-3 the partitioned weights are gathered first."""
        import deepspeed

        student = self.engine.module
        parameters = list(student.parameters())
        gathered = (
            deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
            if self.engine.zero_optimization_partition_weights()
            else None
        )
        with gathered if gathered is not None else torch.no_grad():
            if self.ranks.is_main:
                with transformers_console(self.ranks):
                    export_student(student, alignment.tokens, alignment.lowercase, self.run.student_dir)
        barrier(self.ranks)


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the generator that `device`'s random ops draw from. On the CPU only its own: torch.manual_seed seeds
    every accelerator's generators too, about a millisecond a call, 1 % of a demo student's step."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def build_sampler(cache: CacheReader, plan: RunPlan, alignment: Alignment, config: TrainConfig) -> Sampler:
    """One stream per (teacher, language) of the plan, mapped into the student vocabulary, and the sampler over
    them (languages by p ∝ n^a, teachers by their weights)."""
    streams = {}
    support = config.loss.missing_mass == "support"
    for teacher, language in plan.pairs:
        stream = Stream(
            cache,
            teacher,
            language,
            config.train.seed,
            config.train.eval_fraction,
            config.loss.top_k,
            plan.temperature_column,
            alignment.input_map(teacher),
            alignment.support_target_map(teacher) if support else alignment.id_maps[teacher],
            plan.tail_column,
        )
        streams[stream.key] = stream
    for stream in streams.values():
        if not any(len(stream.training_rows(i)) for i in range(len(stream.shards))):
            raise UserError(f"every document of {stream.key} is held out (lower train.eval_fraction)")
    sizes = {language: cache.manifest.documents(language) for language in plan.selection}
    probabilities = language_probabilities(sizes, config.language_sampling)
    return Sampler(streams, probabilities, plan.selection, config.train.seed)


def held_out_sets(cache: CacheReader, plan: RunPlan, alignment: Alignment, config: TrainConfig) -> list:
    """The held-out windows scored during training: up to eval_rows per (teacher, language), fixed for the run."""
    rule = fraction_rule(config.train.eval_fraction)
    sets = []
    for teacher, language in plan.pairs:
        windows = held_out_windows(cache, teacher, language, rule, config.train.eval_rows, config.loss.top_k)
        if windows.rows:
            sets.append((windows, alignment.input_map(teacher), alignment.id_maps[teacher]))
    return sets
