"""The run folder's owner: what it writes reads back, the metrics log survives a torn last line, and a resume
keeps exactly the records up to its step."""

from __future__ import annotations

import json

import pytest

from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.errors import UserError


def test_metrics_are_read_back_in_order_and_a_torn_last_line_is_left_out(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics.log([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    with run.metrics.path.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 3, "lo')  # a crash in the middle of a write
    assert [record["step"] for record in run.metrics.read()] == [1, 2]


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        run.metrics.read()


def test_resuming_keeps_the_records_up_to_its_step_and_drops_a_torn_line(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics.log([{"step": step, "split": "train"} for step in range(1, 6)] + [{"step": 4, "split": "heldout"}])
    with run.metrics.path.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 6')
    run.metrics.keep_until(4)
    lines = run.metrics.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4]
    assert not list(tmp_path.glob(".*.tmp")), "the file is replaced through a temporary that is renamed away"


def test_what_train_records_reads_back(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.is_run() and run.teachers() is None
    run.write_record({"config_hash": "sha256:x"}, complete=False, cache_dir=tmp_path / "cache")
    run.write_teachers({"de": {"de_bert": 1.0}, "ru": {"ru_bert": 2.0, "multi": 1.0}})
    documents = [f"de:file.txt:{line}" for line in range(200)]
    run.write_held_out(0.25, documents)
    assert run.is_run() and run.record()["complete"] is False
    assert run.cache_dir() == (tmp_path / "cache").resolve()
    assert run.teachers() == {"de": {"de_bert": 1.0}, "ru": {"ru_bert": 2.0, "multi": 1.0}}
    rule = run.held_out_rule()
    assert [d for d in documents if rule(d)] == [d for d in documents if held_out(d, 0.25)]
    assert 0 < sum(map(rule, documents)) < len(documents)


def test_a_folder_without_a_run_says_so(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(UserError, match="not an mdkd run folder"):
        run.record()
    with pytest.raises(UserError, match="has no heldout.json"):
        run.held_out_rule()
