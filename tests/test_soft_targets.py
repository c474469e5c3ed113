"""Soft targets faithful to the teacher, end to end: what stage one records for exactness, what a pure-KD student
learns from a weak teacher in each mode, and the caches and temperatures stage two must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import train_config, write_config

from mdkd.cli import cli
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.teacher_pass.config import load_cache_config
from mdkd.pipeline.teacher_pass.teachers import Teacher, inspect_teacher
from mdkd.pipeline.teacher_pass.windows import padded_inputs


def test_cached_log_partitions_and_entropies_match_the_full_distribution(training_cache):
    """Recompute the teacher's full distribution at some cached positions and compare what stage one stored."""
    cache = CacheReader(training_cache)
    config = load_cache_config(training_cache / "config.yaml")
    spec = next(t for t in config.teachers if t.name == "multi_xlmr")
    info, problems = inspect_teacher(spec, config.top_k, config.max_length)
    assert not problems
    teacher = Teacher(info, torch.device("cpu"), torch.float32)
    shard = cache.manifest.shards_of("multi_xlmr", "ru")[0]
    rows = cache.rows(shard)
    cached = [rows.row(i) for i in range(4)]
    batch = padded_inputs(cached, teacher.pad_id)
    with torch.inference_mode():
        logits = teacher.model(input_ids=batch[0], attention_mask=batch[1]).logits[batch[2], batch[3]]
    full = torch.log_softmax(logits[:, : len(info.tokenizer)].double(), dim=-1)
    partitions = np.concatenate([c.log_partitions for c in cached])
    for column, tau in enumerate(cache.manifest.temperatures):
        expected = torch.logsumexp(full / tau, dim=-1).numpy()
        np.testing.assert_allclose(partitions[:, column], expected, atol=1e-4)
    entropies = rows.entropies[: sum(len(c.positions) for c in cached)]
    np.testing.assert_allclose(entropies, -(full.exp() * full).sum(-1).numpy(), atol=1e-4)
    assert cache.manifest.temperatures == [1.0, 2.0]
    np.testing.assert_allclose(partitions[:, 0], 0.0, atol=1e-5)  # log sum p = 0 at tau = 1


def _pure_kd(tmp_path: Path, cache: Path, name: str, missing_mass: str) -> dict:
    config = train_config(
        teachers={"ru": "multi_xlmr"},
        loss={
            "temperature": 2.0,
            "top_k": 8,
            "alpha": {"schedule": "constant", "start": 1.0},
            "missing_mass": missing_mass,
        },
        train={"steps": 80, "micro_batch_size": 16, "lr": 3.0e-3, "checkpoint_every": 80, "eval_fraction": 0.2},
    )
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--config",
            str(write_config(tmp_path / f"{name}.yaml", config)),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / name),
        ],
    )
    assert result.exit_code == 0, result.output
    evaluated = CliRunner().invoke(cli, ["eval", str(tmp_path / name)])
    assert evaluated.exit_code == 0, evaluated.output
    return json.loads((tmp_path / name / "eval.json").read_text())["languages"]["ru"]["windows"]["multi_xlmr"]


def test_pure_kd_from_a_weak_teacher_keeps_its_tempered_top_k_mass(training_cache, tmp_path):
    """The tiny random teachers are weak: their top-8 holds a few percent of their mass. Taught with `rest`, the
    student puts about the teacher's share of its tau = 2 mass on the teacher's top-8 ids; taught with
    `renormalize`, it learns that those ids hold everything, and puts far more there."""
    rest = _pure_kd(tmp_path, training_cache, "rest", "rest")
    renormalized = _pure_kd(tmp_path, training_cache, "renormalize", "renormalize")
    print(json.dumps({"rest": rest, "renormalize": renormalized}))
    teacher_mass = rest["teacher"]["topk_mass_tau2"]
    assert teacher_mass < 0.1, teacher_mass  # a weak teacher, as the test needs
    assert renormalized["teacher"]["topk_mass_tau2"] == teacher_mass  # same positions, same cache
    assert abs(rest["model"]["topk_mass_tau2"] - teacher_mass) < 0.5 * teacher_mass, (rest, teacher_mass)
    assert renormalized["model"]["topk_mass_tau2"] > 3 * teacher_mass, (renormalized, teacher_mass)


def _as_older_schema(training_cache: Path, tmp_path: Path, version: int) -> Path:
    """A copy of the cache as an older mdkd wrote it: schema 2 without the tail columns and the tail's manifest
    fields; schema 1 also without log-partitions and entropies, with plain-hex shard hashes and no temperatures."""
    import hashlib

    cache = tmp_path / f"schema{version}"
    shutil.copytree(training_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    dropped = ["tail_ids", "tail_counts", "tail_logprobs"] + (["log_partitions", "entropies"] if version == 1 else [])
    for shard in manifest["shards"]:
        path = cache / shard["path"]
        pq.write_table(pq.read_table(path).drop_columns(dropped), path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shard.update(bytes=path.stat().st_size, sha256=digest if version == 1 else "sha256:" + digest)
    del manifest["tail_samples"], manifest["tail_temperature"]
    manifest.update(schema_version=version)
    if version == 1:
        manifest.update(config_hash="0" * 64)
        del manifest["temperatures"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def test_a_schema_2_cache_is_read_verified_and_trains_with_support(training_cache, tmp_path):
    """Caches written before the sampled tail (and before twins were summed) still serve the default loss."""
    cache = _as_older_schema(training_cache, tmp_path, 2)
    runner = CliRunner()
    assert runner.invoke(cli, ["cache", "verify", str(cache)]).exit_code == 0
    result = runner.invoke(
        cli,
        ["train", "--config", str(write_config(tmp_path / "c.yaml", train_config())), "--cache", str(cache)]
        + ["--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    sampled = train_config(loss={"tail": "sampled"})
    result = runner.invoke(
        cli,
        ["train", "--config", str(write_config(tmp_path / "s.yaml", sampled)), "--cache", str(cache)]
        + ["--out", str(tmp_path / "sampled")],
    )
    assert result.exit_code == 2 and "needs a cache with tail draws" in result.stderr


def test_a_schema_1_cache_trains_with_renormalize_only(training_cache, tmp_path):
    cache = _as_older_schema(training_cache, tmp_path, 1)
    runner = CliRunner()
    renormalize = train_config(loss={"missing_mass": "renormalize"}, train={"steps": 2})
    result = runner.invoke(
        cli,
        [
            "train",
            "--config",
            str(write_config(tmp_path / "a.yaml", renormalize)),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli,
        [
            "train",
            "--config",
            str(write_config(tmp_path / "b.yaml", train_config())),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: loss.missing_mass 'support' needs the tempered log-partitions that this schema-1 cache lacks (rebuild "
        "the cache with this mdkd, or set loss.missing_mass: renormalize)"
    ]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_temperature_the_cache_did_not_record_is_refused(training_cache, tmp_path, command):
    config = write_config(tmp_path / "c.yaml", train_config(loss={"temperature": 3.0}))
    args = ["--config", str(config), "--cache", str(training_cache), "--out", str(tmp_path / "run")]
    if command == "validate":
        args = [str(config), "--cache", str(training_cache)]
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 2
    assert "loss.temperature 3 was not recorded in the cache (it has 1, 2;" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "run").exists()
