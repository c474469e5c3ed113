"""Experiment trackers (TensorBoard, W&B, CSV, Comet) as one more `MetricsLogger`, through DeepSpeed's monitors.

Why DeepSpeed's monitors: DeepSpeed is already the training engine, its monitors take plain (tag, value, step)
events, which is what a metrics record flattens into, and one interface covers the four trackers. transformers'
integrations are `Trainer` callbacks that expect its TrainingArguments and TrainerState, which mdkd's loop has
not got. The monitors are built here rather than from the engine's config, so that the engine logs none of its
own sample-counted events beside mdkd's step-counted ones.

Every number in a record becomes one event: its tag is the record's split and keys joined by `/` (`train/loss`,
`train/per_language/de/kd_loss`, `heldout/per_window/de/de_bert/accuracy`), its step the record's step.

A resumed run: TensorBoard's writer is opened with `purge_step` at the resumed step, so TensorBoard hides what
the first session logged past its checkpoint; W&B resumes the run that crashed in the same folder
(`resume="auto"`, W&B's own record of it); CSV files get the new rows appended after the old ones.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

from mdkd.pipeline.distill.config import TrackersConfig
from mdkd.pipeline.errors import UserError

# What each tracker imports, and how to get it (CSV needs nothing beyond DeepSpeed).
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'mdkd[trackers]'"),
    "wandb": ("wandb", "pip install 'mdkd[trackers]'"),
    "comet": ("comet_ml", "pip install 'comet_ml>=3.41'"),
}


def require_packages(settings: TrackersConfig) -> None:
    """Refuse, before anything is trained, a tracker whose package is not installed."""
    for tracker in (t for t in settings.report_to if t in PACKAGES):
        package, install = PACKAGES[tracker]
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(
                f"trackers.report_to names {tracker}, but the {package} package is not installed ({install})"
            ) from None


def record_events(record: dict) -> list[tuple[str, float, int]]:
    """A metrics record as (tag, value, step) events: every number in it, tagged by its split and keys."""
    step = record["step"]
    fields = {key: value for key, value in record.items() if key not in ("step", "split")}
    return [(tag, value, step) for tag, value in _numbers(record["split"], fields)]


def _numbers(prefix: str, values: dict) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from _numbers(tag, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)


class Trackers:
    """A `MetricsLogger` that sends each record to the configured trackers; opened on rank 0 only."""

    def __init__(self, settings: TrackersConfig, folder: Path, run_name: str, run_config: dict, resumed_at: int):
        """Open the trackers of `settings`, writing under `folder`; the run is named `settings.name` or
        `run_name`, its config is `run_config`, and it continues after step `resumed_at` (0: from the start)."""
        from deepspeed.monitor.config import get_monitor_config

        name = settings.name or run_name
        chosen = set(settings.report_to)
        config = get_monitor_config(
            {
                "tensorboard": {
                    "enabled": "tensorboard" in chosen,
                    "output_path": str(folder / "tensorboard"),
                    "job_name": name,
                },
                "wandb": {
                    "enabled": "wandb" in chosen,
                    "project": settings.project,
                    "group": settings.group,
                    "team": settings.entity,
                },
                "csv_monitor": {"enabled": "csv" in chosen, "output_path": str(folder / "csv"), "job_name": name},
                # Comet's monitor logs an event only every `samples_log_interval` of its step: every step here.
                "comet": {
                    "enabled": "comet" in chosen,
                    "project": settings.project,
                    "workspace": settings.entity,
                    "experiment_name": name,
                    "samples_log_interval": 1,
                },
            }
        )
        # Each monitor, and how to release what it holds (DeepSpeed's monitors have no close of their own).
        self.monitors, self.closers = [], []
        if config.tensorboard.enabled:
            monitor = _tensorboard_monitor(config.tensorboard, purge_step=resumed_at + 1)
            self.monitors.append(monitor)
            self.closers.append(monitor.summary_writer.close)
        if config.wandb.enabled:
            import wandb

            self.monitors.append(_wandb_monitor(config.wandb, folder, name, run_config))
            self.closers.append(wandb.finish)
        if config.csv_monitor.enabled:
            from deepspeed.monitor.csv_monitor import csvMonitor

            self.monitors.append(csvMonitor(config.csv_monitor))
        if config.comet.enabled:
            from deepspeed.monitor.comet import CometMonitor

            monitor = CometMonitor(config.comet)
            self.monitors.append(monitor)
            self.closers.append(monitor.experiment.end)

    def log(self, records: list[dict]) -> None:
        events = [event for record in records for event in record_events(record)]
        for monitor in self.monitors:
            monitor.write_events(events)

    def close(self) -> None:
        for close in self.closers:
            close()


def _tensorboard_monitor(config, purge_step: int):
    """DeepSpeed's TensorBoard monitor with its writer opened at `purge_step`: TensorBoard then hides the events at
    that step and later that an earlier session of the run logged before it stopped."""
    from deepspeed.monitor.tensorboard import TensorBoardMonitor

    class ResumableTensorBoardMonitor(TensorBoardMonitor):
        def get_summary_writer(self):
            from torch.utils.tensorboard import SummaryWriter

            log_dir = os.path.join(self.output_path, self.job_name)
            os.makedirs(log_dir, exist_ok=True)
            self.summary_writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
            return self.summary_writer

    return ResumableTensorBoardMonitor(config)


def _wandb_monitor(config, folder: Path, name: str, run_config: dict):
    """DeepSpeed's W&B monitor, which passes wandb.init its project, group and team only: the folder, the run's
    name, auto-resume and no console capture go through W&B's own environment variables while it starts."""
    from deepspeed.monitor.wandb import WandbMonitor

    folder.mkdir(parents=True, exist_ok=True)
    with _environment(WANDB_DIR=str(folder), WANDB_NAME=name, WANDB_RESUME="auto", WANDB_CONSOLE="off"):
        monitor = WandbMonitor(config)
    import wandb

    wandb.run.config.update(run_config, allow_val_change=True)
    return monitor


@contextlib.contextmanager
def _environment(**variables: str):
    """Set environment variables for the duration of the block (a variable the user set is kept)."""
    added = {key: value for key, value in variables.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
