"""Experiment trackers: a tiny run's figures read back with TensorBoard's and W&B's own formats, a resumed run logged
once per step, and a missing tracker package refused before anything is trained."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, train, train_config, unfinished_copy, write_config

# Nothing may reach the network: W&B writes an offline run, prints nothing and asks for no login.
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} for every number in metrics.jsonl, tagged by split and keys joined by `/`."""
    scalars: dict[str, dict[int, float]] = {}

    def walk(prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}/{key}", value, step)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                scalars.setdefault(f"{prefix}/{key}", {})[step] = float(value)

    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        walk(record["split"], {k: v for k, v in record.items() if k not in ("step", "split")}, record["step"])
    return scalars


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def wandb_history(run_file: Path) -> dict[int, dict]:
    """{step: {key: value}} from an offline W&B run file: its records (W&B's own protobuf `Record`) in the
    LevelDB log framing W&B writes them in (a 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pending, history = 7, b"", {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (2, 3):  # first, middle
            pending += chunk
            continue
        if kind not in (1, 4):  # anything but full and last: padding
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, training_cache) -> Path:
    """A tiny run watched by TensorBoard, an offline W&B run and CSV files (8 steps, held-out every 4)."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    config = train_config(trackers={"report_to": ["tensorboard", "wandb", "csv"], "project": "mdkd-test"})
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        result = train(tmp_path, training_cache, config)
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_tensorboard_event_files_hold_every_figure_of_metrics_jsonl(tracked_run):
    found = tensorboard_scalars(tracked_run / "trackers" / "tensorboard" / "run")
    expected = expected_scalars(tracked_run)
    for tag in (
        "train/loss",
        "train/kd_loss",
        "train/mlm_loss",
        "train/alpha",
        "train/lr",
        "train/tokens_per_second",
        "train/per_language/de/kd_loss",
        "train/per_language/ru/mlm_loss",
        "heldout/per_language/de/accuracy",
        "heldout/per_window/de/de_bert/accuracy",
        "heldout/per_window/ru/multi_xlmr/perplexity",
    ):
        assert tag in found, f"{tag} missing from {sorted(found)}"
    assert set(found) == set(expected)
    for tag, points in found.items():
        assert [step for step, _ in points] == sorted(expected[tag]), tag
        assert [value for _, value in points] == pytest.approx([expected[tag][s] for s, _ in points], rel=1e-6)
    assert [step for step, _ in found["heldout/per_language/de/accuracy"]] == [4, 8]
    assert len(found["train/loss"]) == 8


def test_wandb_offline_run_logged_every_figure_at_its_step(tracked_run):
    run_files = list((tracked_run / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    history = wandb_history(run_files[0])
    expected = expected_scalars(tracked_run)
    assert sorted(history) == list(range(1, 9))
    logged = {(key, step): value for step, values in history.items() for key, value in values.items()}
    assert set(logged) == {(tag, step) for tag, points in expected.items() for step in points}
    for (tag, step), value in logged.items():
        assert value == pytest.approx(expected[tag][step], rel=1e-9), (tag, step)


def test_csv_files_hold_each_figure_per_step(tracked_run):
    lines = (tracked_run / "trackers" / "csv" / "run" / "train_kd_loss.csv").read_text().splitlines()
    expected = expected_scalars(tracked_run)["train/kd_loss"]
    assert lines[0] == "step,kd_loss"
    assert {int(s): float(v) for s, v in (line.split(",") for line in lines[1:])} == expected


def test_resumed_events_in_one_folder_replace_the_first_sessions_later_steps(tmp_path, training_cache):
    """The first session (8 steps) and a resume from its step-4 checkpoint write one log folder: TensorBoard's
    reader keeps steps 1-4 of the first and 5-8 of the second, each once."""
    config = train_config(trackers={"report_to": ["tensorboard"], "name": "shared", "dir": str(tmp_path / "tb")})
    first = train(tmp_path, training_cache, config)
    assert first.exit_code == 0, first.output
    crashed = unfinished_copy(tmp_path / "run", tmp_path / "crashed", died_after=6, last_checkpoint=4)
    resumed = train(tmp_path, training_cache, config, "crashed", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    folder = tmp_path / "tb" / "tensorboard" / "shared"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    found = tensorboard_scalars(folder)
    assert [step for step, _ in found["train/loss"]] == list(range(1, 9))
    expected = expected_scalars(crashed)
    assert [v for _, v in found["train/loss"]] == pytest.approx([expected["train/loss"][s] for s in range(1, 9)])


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_training(tmp_path, training_cache, tracker, package):
    config = write_config(tmp_path / "train.yaml", train_config(trackers={"report_to": [tracker]}))
    script = (
        f"import sys; sys.modules[{package!r}] = None; from mdkd.cli import main; "
        f"sys.argv = ['mdkd', 'train', '--config', {str(config)!r}, '--cache', {str(training_cache)!r}, "
        f"'--out', {str(tmp_path / 'run')!r}]; main()"
    )
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: trackers.report_to names {tracker}, but the {package} package is not installed "
        "(pip install 'mdkd[trackers]')"
    ]
    assert not (tmp_path / "run").exists()


def test_trackers_are_not_part_of_the_config_hash():
    from mdkd.pipeline.distill.config import TrainConfig

    plain = TrainConfig.model_validate(train_config())
    tracked = TrainConfig.model_validate(train_config(trackers={"report_to": ["tensorboard", "wandb"]}))
    assert plain.content_hash() == tracked.content_hash()
    assert plain.model_dump()["trackers"] != tracked.model_dump()["trackers"]
