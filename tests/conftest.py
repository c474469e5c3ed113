"""Shared fixtures: a small multilingual corpus and tiny teachers built in-test (no hub, no network)."""

from __future__ import annotations

import json
import random
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from mdkd.tiny_models import build_masked_lm, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CORPUS = REPO / "examples" / "tiny" / "corpus"


def free_port() -> int:
    """A free local port for a torchrun rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """`torchrun --nproc_per_node 2` on a free local port, then `args` (e.g. "-m", "mdkd", ...)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launcher, "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def sentences(language: str) -> list[str]:
    return [line for line in (EXAMPLE_CORPUS / f"{language}.txt").read_text(encoding="utf-8").splitlines() if line]


def make_documents(language: str, count: int, seed: int = 0) -> list[str]:
    """`count` documents of 1 to 6 sentences each, so some span several windows."""
    rng = random.Random(f"{language}{seed}")
    pool = sentences(language)
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) for _ in range(count)]


@pytest.fixture(scope="session")
def teachers_dir(tmp_path_factory) -> Path:
    """A German WordPiece BERT and a multilingual Unigram XLM-R, saved like hub checkpoints."""
    root = tmp_path_factory.mktemp("teachers")
    german = sentences("de")
    everything = german + sentences("en") + sentences("ru")
    build_masked_lm("bert", train_tokenizer("wordpiece", german, 300, root / "de_bert"), root / "de_bert", seed=1)
    build_masked_lm(
        "xlm-roberta", train_tokenizer("unigram", everything, 400, root / "multi_xlmr"), root / "multi_xlmr", seed=2
    )
    return root


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """de and ru text files with blank lines, plus one line that is not UTF-8 in the German file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    german = make_documents("de", 24)
    german.insert(5, "")
    (folder / "de.txt").write_bytes(
        ("\n".join(german[:10]) + "\n").encode() + b"\xff\xfe broken line\n" + ("\n".join(german[10:]) + "\n").encode()
    )
    (folder / "ru.txt").write_text("\n".join(make_documents("ru", 16)) + "\n\n", encoding="utf-8")
    return folder


def cache_config(teachers_dir: Path, corpus_dir: Path, **overrides) -> dict:
    config = {
        "corpus": [
            {"language": "de", "path": str(corpus_dir / "de.txt")},
            {"language": "ru", "path": str(corpus_dir / "ru.txt")},
        ],
        "teachers": [
            {"name": "de_bert", "model": str(teachers_dir / "de_bert"), "languages": ["de"]},
            {"name": "multi_xlmr", "model": str(teachers_dir / "multi_xlmr"), "languages": ["de", "ru"]},
        ],
        "masking": {"probability": 0.15, "mask": 0.8, "random": 0.1, "keep": 0.1, "seed": 0, "copies": 2},
        "max_length": 32,
        "top_k": 5,
        "batch_tokens": 512,
        "shard_documents": 6,
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory, teachers_dir) -> Path:
    """A complete cache for stage two: de served by both teachers, ru by the multilingual one; k = 8."""
    from click.testing import CliRunner

    from mdkd.cli import cli

    root = tmp_path_factory.mktemp("training_cache")
    (root / "de.txt").write_text("\n".join(make_documents("de", 60, seed=5)) + "\n", encoding="utf-8")
    (root / "ru.txt").write_text("\n".join(make_documents("ru", 40, seed=5)) + "\n", encoding="utf-8")
    config = cache_config(teachers_dir, root, top_k=8, shard_documents=16)
    config["corpus"] = [
        {"language": "de", "path": str(root / "de.txt")},
        {"language": "ru", "path": str(root / "ru.txt")},
    ]
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(root / "cache.yaml", config)), "--out", str(root / "cache")]
    )
    assert result.exit_code == 0, result.output
    return root / "cache"


def train_config(**overrides) -> dict:
    """A small, fast train config; nested sections given in `overrides` replace the defaults' keys one by one."""
    config = {
        "student": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 128, "dropout": 0.1},
        "loss": {"temperature": 2.0, "top_k": 8, "alpha": {"schedule": "linear", "start": 1.0}},
        "train": {
            "steps": 8,
            "micro_batch_size": 8,
            "lr": 2.0e-3,
            "warmup": 0.1,
            "checkpoint_every": 4,
            "eval_fraction": 0.1,
        },
        "precision": "fp32",
    }
    for key, value in overrides.items():
        config[key] = (
            {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
        )
    return config


def train(tmp_path: Path, cache: Path, config: dict, out: str = "run", *extra: str):
    """`mdkd train` in process, the config written to tmp_path/<out>.yaml and the run into tmp_path/<out>."""
    from click.testing import CliRunner

    from mdkd.cli import cli

    path = write_config(tmp_path / f"{out}.yaml", config)
    return CliRunner().invoke(
        cli, ["train", "--config", str(path), "--cache", str(cache), "--out", str(tmp_path / out), *extra]
    )


def metrics(run: Path) -> list[dict]:
    """The training lines of a run's metrics.jsonl (held-out evaluations are lines of their own)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if line["split"] == "train"]


def unfinished_copy(run: Path, into: Path, died_after: int, last_checkpoint: int) -> Path:
    """A copy of a finished run as it would be had it died after step `died_after`, its newest checkpoint the one
    of step `last_checkpoint`: no student, no later checkpoint, metrics up to `died_after`, not complete."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "student")
    for folder in (into / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > last_checkpoint:
            shutil.rmtree(folder)
    (into / "checkpoints" / "latest").write_text(f"step-{last_checkpoint:07d}")
    lines = (into / "metrics.jsonl").read_text().splitlines()
    (into / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] <= died_after)
    )
    record = json.loads((into / "run.json").read_text())
    (into / "run.json").write_text(json.dumps({**record, "complete": False}))
    return into
