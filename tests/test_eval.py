"""`mdkd eval`: metrics against hand-computed values, teachers read from the cache, runs and model folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import train_config, write_config
from mdkd.cli import cli
from mdkd.pipeline.evaluation import MetricSums, model_sums, teacher_sums


def test_model_metrics_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]))
    labels = torch.tensor([0, 1, -1])  # the third label cannot be spelled by the model: left out
    teacher_ids = torch.tensor([[0, 1], [2, 0], [-1, 0]])
    teacher_logprobs = torch.log(torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.9, 0.1]]))
    result = model_sums(logits, labels, teacher_ids, teacher_logprobs).result()
    assert result["positions"] == 2 and result["accuracy"] == 0.5
    assert result["perplexity"] == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.3)) / 2), rel=1e-5)
    assert result["agreement"] == 1.0  # rows 1 and 2: top-1 0 == 0 and 2 == 2; row 3 has no teacher top-1
    # Exact KL at tau = 1 over the teacher's top-k plus one bucket for everything else (rest 0.2, then 0).
    q1, p1 = np.array([0.6, 0.2, 0.2]), np.array([0.7, 0.2, 0.1])
    q2, p2 = np.array([0.5, 0.5]), np.array([0.6, 0.1])
    expected_kl = ((q1 * np.log(q1 / p1)).sum() + (q2 * np.log(q2 / p2)).sum()) / 2
    assert result["kl"] == pytest.approx(expected_kl, rel=1e-4)


def test_teacher_metrics_by_hand():
    ids = np.array([[5, 3, 9], [2, 4, 8], [1, 0, 6]])
    logprobs = np.log(np.array([[0.5, 0.3, 0.1], [0.4, 0.2, 0.1], [0.6, 0.2, 0.05]]))
    labels = np.array([5, 4, 7])  # top-1 hit, in the top-k at rank 2, outside the top-k
    result = teacher_sums(ids, logprobs, labels).result()
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.2) + math.log(0.05)) / 3))


def test_sums_pool_across_batches():
    a, b = MetricSums(positions=2, correct=1, nll=2.0), MetricSums(positions=3, correct=3, nll=1.0)
    a.add(b)
    assert a.result()["accuracy"] == 0.8 and a.result()["perplexity"] == pytest.approx(math.exp(3 / 5))


def test_a_teacher_scored_on_its_own_windows_agrees_with_its_cache(training_cache, teachers_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(teachers_dir / "de_bert"), "--cache", str(training_cache),
                                      "--eval-fraction", "0.3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    own = report["languages"]["de"]["windows"]["de_bert"]
    assert own["model"]["positions"] == own["teacher"]["positions"] > 0
    assert own["model"]["agreement"] == 1.0
    assert own["model"]["accuracy"] == pytest.approx(own["teacher"]["accuracy"])
    assert own["model"]["perplexity"] >= own["teacher"]["perplexity"] * (1 - 1e-6), "the cache gives a lower bound"
    assert "de" in result.stdout and "de_bert acc" in result.stdout
    assert report["languages"]["de"]["raw_text"]["positions"] > 0


def test_eval_of_a_run_writes_eval_json(training_cache, tmp_path):
    config = write_config(tmp_path / "train.yaml", train_config(train={"eval_fraction": 0.3}))
    trained = CliRunner().invoke(cli, ["train", "--config", str(config), "--cache", str(training_cache), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    heldout_lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"heldout"' in l]
    assert [l["step"] for l in heldout_lines] == [4, 8] and "de" in heldout_lines[-1]["per_language"]
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(report["languages"]) == {"de", "ru"}
    assert set(report["languages"]["de"]["windows"]) == {"de_bert", "multi_xlmr"}
    for language in report["languages"].values():
        assert 0 <= language["model"]["accuracy"] <= 1 and language["model"]["perplexity"] > 1


@pytest.mark.parametrize(
    "make, args, fragment",
    [
        (lambda p: p, [], "neither an mdkd run folder nor a model folder"),
        (lambda p: (p / "run.json").write_text("{}") and p, [], "has no exported student yet"),
    ],
)
def test_eval_bad_input(tmp_path, make, args, fragment):
    make(tmp_path)
    result = CliRunner().invoke(cli, ["eval", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr


def test_eval_of_a_model_folder_needs_a_cache(teachers_dir):
    result = CliRunner().invoke(cli, ["eval", str(teachers_dir / "de_bert")])
    assert result.exit_code == 2 and "give --cache DIR" in result.stderr
