"""`mdkd report` and sweeps: tables from tiny runs, plots, runs still going, finished runs skipped, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import train_config, write_config

from mdkd.cli import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, training_cache):
    """A 2-run sweep over k' against the training cache (trained, evaluated, reported)."""
    root = tmp_path_factory.mktemp("sweep")
    config = write_config(
        root / "base.yaml", train_config(train={"steps": 6, "checkpoint_every": 3, "eval_fraction": 0.3})
    )
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(config),
            "--cache",
            str(training_cache),
            "--out",
            str(root / "out"),
            "--sweep",
            "loss.top_k=2,8",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def test_sweep_trains_every_combination_and_reports(sweep):
    out = sweep / "out"
    assert sorted(p.name for p in out.iterdir()) == ["configs", "loss.top_k=2", "loss.top_k=8", "report"]
    for name in ("loss.top_k=2", "loss.top_k=8"):
        assert json.loads((out / name / "run.json").read_text())["complete"]
        assert (out / name / "eval.json").exists()
    rows = list(csv.DictReader((out / "report" / "report.csv").open()))
    assert [(r["run"], r["loss.top_k"]) for r in rows] == [("loss.top_k=2", "2"), ("loss.top_k=8", "8")]
    # Per (language, teacher): the student's accuracy at [MASK] positions of that teacher's windows, its ratio to the
    # teacher's on the same positions, and its accuracy over all masked positions; no pooled per-language column,
    # and no held-out columns when every run has eval.json.
    pairs = ["de/de_bert", "de/multi_xlmr", "ru/multi_xlmr"]
    columns = ("[MASK] acc", "[MASK] ratio", "all acc")
    assert [h for h in rows[0] if h.startswith((*columns, "heldout "))] == [
        f"{column} {pair}" for pair in pairs for column in columns
    ]
    for row in rows:
        report = json.loads((out / row["run"] / "eval.json").read_text())
        for pair in pairs:
            language, teacher = pair.split("/")
            scored = report["languages"][language]["windows"][teacher]
            masked = scored["by_kind"]["mask"]
            assert float(row[f"[MASK] acc {pair}"]) == pytest.approx(masked["model"]["accuracy"])
            ratio = masked.get("accuracy_ratio")  # absent where the teacher has no hit at [MASK] positions
            assert (float(row[f"[MASK] ratio {pair}"]) if row[f"[MASK] ratio {pair}"] else None) == pytest.approx(ratio)
            assert float(row[f"all acc {pair}"]) == pytest.approx(scored["model"]["accuracy"])
            assert masked["model"]["positions"] == masked["teacher"]["positions"] < scored["positions"]
    markdown = (out / "report" / "report.md").read_text()
    assert markdown.startswith("| run | loss.top_k | steps |")
    for plot in ("loss_curves.png", "accuracy.png"):
        data = (out / "report" / plot).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_rerunning_a_sweep_skips_finished_runs(sweep, training_cache):
    metrics = sweep / "out" / "loss.top_k=8" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(sweep / "base.yaml"),
            "--cache",
            str(training_cache),
            "--out",
            str(sweep / "out"),
            "--sweep",
            "loss.top_k=2,8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("already complete; nothing to do") == 2
    assert metrics.stat().st_mtime_ns == before


def test_report_reads_a_run_that_is_still_going(sweep, tmp_path):
    going = tmp_path / "going"
    shutil.copytree(sweep / "out" / "loss.top_k=2", going)
    (going / "eval.json").unlink()
    lines = (going / "metrics.jsonl").read_text().splitlines()
    (going / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # steps 1-3 and the held-out line of step 3
    status = json.loads((going / "run.json").read_text())
    (going / "run.json").write_text(json.dumps({**status, "complete": False}))
    result = CliRunner().invoke(
        cli, ["report", str(sweep / "out" / "loss.top_k=8"), str(going), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "r" / "report.csv").open()))
    assert rows[1]["run"] == "going" and rows[1]["complete"] == "False" and rows[1]["steps"] == "3"
    # Without eval.json: no comparison with the teachers, the training's held-out accuracy instead.
    assert rows[1]["[MASK] acc de/de_bert"] == "" and rows[0]["[MASK] acc de/de_bert"] != ""
    assert rows[1]["heldout acc de"] != "" and rows[0]["heldout acc de"] == ""


def test_an_eval_json_from_before_the_like_for_like_scoring_is_not_reported(sweep, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sweep / "out" / "loss.top_k=2", old)
    report = json.loads((old / "eval.json").read_text())
    (old / "eval.json").write_text(json.dumps({k: v for k, v in report.items() if k != "scope"}))
    result = CliRunner().invoke(cli, ["report", str(old), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "r" / "report.csv").open()))
    assert not any(key.startswith(("[MASK] acc ", "all acc ")) for key in row) and row["heldout acc de"] != ""


@pytest.mark.parametrize(
    "prepare, fragment",
    [
        (lambda p: None, "is not an mdkd run folder"),
        (lambda p: (p / "run.json").write_text("{}") and (p / "config.yaml").write_text("{}"), "has no metrics yet"),
    ],
)
def test_report_bad_input(tmp_path, prepare, fragment):
    prepare(tmp_path)
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0 and fragment in result.stderr


@pytest.mark.parametrize(
    "sweep, fragment, first",
    [
        # Invalid on its own: the config is checked before any combination trains.
        ("loss.top_k=4,0", "loss.top_k=0: loss.top_k: Input should be greater than or equal to 1", "loss.top_k=4"),
        # Valid alone, but the cache recorded no log-partition at tau 4: checked against the cache up front too.
        (
            "loss.temperature=2,4",
            "loss.temperature=4: loss.temperature 4 was not recorded in the cache (it has 1, 2;",
            "loss.temperature=2",
        ),
    ],
)
def test_a_sweep_is_refused_before_any_training(tmp_path, training_cache, sweep, fragment, first):
    config = write_config(tmp_path / "base.yaml", train_config())
    arguments = ["train", "--config", str(config), "--cache", str(training_cache), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*arguments, "--sweep", sweep])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert fragment in result.stderr
    assert not (tmp_path / "out" / first / "run.json").exists()
