"""Every bad input: one line on stderr naming the problem, exit status 2, no traceback, no complete manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cache_config, write_config
from transformers import GPT2Config, GPT2LMHeadModel

from mdkd.cli import cli
from mdkd.tiny_models import build_masked_lm, train_tokenizer


def assert_one_line_error(result, out: Path, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    manifest = out / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


def run(tmp_path: Path, config: dict):
    path = write_config(tmp_path / "c.yaml", config)
    return CliRunner().invoke(cli, ["cache-logits", "--config", str(path), "--out", str(tmp_path / "out")])


def test_missing_corpus_file(tmp_path, teachers_dir, corpus_dir):
    config = cache_config(teachers_dir, corpus_dir)
    config["corpus"][1]["path"] = str(tmp_path / "nowhere" / "ru.txt")
    assert_one_line_error(run(tmp_path, config), tmp_path / "out", "corpus file not found")


def test_unreadable_corpus_file(tmp_path, teachers_dir, corpus_dir):
    (corpus_dir / "ru.parquet").write_bytes(b"this is not parquet at all")
    config = cache_config(teachers_dir, corpus_dir)
    config["corpus"][1]["path"] = str(corpus_dir / "ru.parquet")
    assert_one_line_error(run(tmp_path, config), tmp_path / "out", "not a readable Parquet file")


def test_corpus_empty_after_blank_lines(tmp_path, teachers_dir, corpus_dir):
    (corpus_dir / "ru.txt").write_text("\n   \n\t\n", encoding="utf-8")
    assert_one_line_error(run(tmp_path, cache_config(teachers_dir, corpus_dir)), tmp_path / "out", "has no documents")


def test_teacher_path_that_does_not_exist(tmp_path, teachers_dir, corpus_dir):
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(tmp_path / "no_teacher_here")
    assert_one_line_error(run(tmp_path, config), tmp_path / "out", "folder not found")


def test_teacher_that_is_not_a_masked_lm(tmp_path, teachers_dir, corpus_dir):
    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt)
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(gpt)
    config["teachers"][0]["tokenizer"] = str(teachers_dir / "de_bert")
    assert_one_line_error(run(tmp_path, config), tmp_path / "out", "not a masked LM")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, teachers_dir, corpus_dir):
    small = train_tokenizer("wordpiece", ["ab cd ef"] * 5, 40, tmp_path / "small_tok")
    build_masked_lm("bert", small, tmp_path / "small_bert")
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(tmp_path / "small_bert")
    config["teachers"][0]["tokenizer"] = str(teachers_dir / "de_bert")
    assert_one_line_error(run(tmp_path, config), tmp_path / "out", "but the model's vocabulary has")


def test_top_k_larger_than_a_vocabulary(tmp_path, teachers_dir, corpus_dir):
    assert_one_line_error(
        run(tmp_path, cache_config(teachers_dir, corpus_dir, top_k=100000)), tmp_path / "out", "top_k 100000 is larger"
    )


def test_invalid_config(tmp_path, teachers_dir, corpus_dir):
    result = run(tmp_path, cache_config(teachers_dir, corpus_dir, batch_tokens="lots", typo_key=3))
    assert_one_line_error(result, tmp_path / "out", "typo_key: unknown key")
    assert "batch_tokens" in result.stderr


def test_max_length_beyond_the_teachers_positions(tmp_path, teachers_dir, corpus_dir):
    result = run(tmp_path, cache_config(teachers_dir, corpus_dir, max_length=4096))
    assert_one_line_error(result, tmp_path / "out", "max_length 4096 is longer than the 512 positions")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"device": "gpu"}, "device: String should match pattern"),
        ({"teachers": [{"name": "t", "model": "org/x", "languages": ["de/../x"]}]}, "language names are folder names"),
    ],
)
def test_config_values_that_would_fail_later(tmp_path, teachers_dir, corpus_dir, change, fragment):
    assert_one_line_error(run(tmp_path, cache_config(teachers_dir, corpus_dir, **change)), tmp_path / "out", fragment)


def test_out_folder_that_is_not_a_cache(tmp_path, teachers_dir, corpus_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert_one_line_error(run(tmp_path, cache_config(teachers_dir, corpus_dir)), tmp_path / "out", "not an mdkd cache")
    assert (tmp_path / "out" / "precious.txt").exists()


@pytest.mark.parametrize("verb", [["cache", "verify"], ["cache", "inspect"]])
def test_cache_tools_on_a_folder_that_is_not_a_cache(tmp_path, verb):
    result = CliRunner().invoke(cli, verb + [str(tmp_path)])
    assert_one_line_error(result, tmp_path, "is not an mdkd cache")


def test_real_process_prints_no_traceback(tmp_path, teachers_dir, corpus_dir):
    config = cache_config(teachers_dir, corpus_dir)
    config["corpus"][0]["path"] = str(tmp_path / "gone.txt")
    path = write_config(tmp_path / "c.yaml", config)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: invalid config")
    assert not (tmp_path / "o").exists()


# Stage two: `mdkd train`.


def run_train(tmp_path: Path, cache: Path, config: dict, *extra: str):
    from conftest import write_config

    path = write_config(tmp_path / "train.yaml", config)
    return CliRunner().invoke(
        cli, ["train", "--config", str(path), "--cache", str(cache), "--out", str(tmp_path / "run"), *extra]
    )


def assert_train_error(result, tmp_path: Path, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    run_file = tmp_path / "run" / "run.json"
    assert not run_file.exists() or not json.loads(run_file.read_text())["complete"]
    assert not (tmp_path / "run" / "student").exists()


def _copy_cache(training_cache: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(training_cache, tmp_path / "cache")
    return tmp_path / "cache"


def test_train_on_an_incomplete_cache(tmp_path, training_cache):
    from conftest import train_config

    cache = _copy_cache(training_cache, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert_train_error(run_train(tmp_path, cache, train_config()), tmp_path, "is incomplete")


def test_train_on_a_cache_that_fails_verification(tmp_path, training_cache):
    from conftest import train_config

    cache = _copy_cache(training_cache, tmp_path)
    shard = next((cache / "multi_xlmr" / "ru").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x55
    shard.write_bytes(bytes(data))
    assert_train_error(run_train(tmp_path, cache, train_config()), tmp_path, "is damaged")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"teachers": {"de": "fr_bert"}}, "teacher 'fr_bert' is not in the cache"),
        ({"teachers": {"fr": "multi_xlmr"}}, "language 'fr' is not in the cache"),
        ({"teachers": {"ru": "de_bert"}}, "teacher 'de_bert' did not cache language 'ru'"),
        ({"loss": {"top_k": 9}}, "loss.top_k 9 is above the cached top_k 8"),
        ({"loss": {"temperature": 0}}, "loss.temperature: Input should be greater than 0"),
        (
            {"student": {"preset": None, "hidden_size": 30, "num_layers": 1, "num_heads": 4, "intermediate_size": 8}},
            "not divisible",
        ),
        ({"train": {"steps": 10, "bogus": 1}}, "train.bogus: unknown key"),
    ],
)
def test_train_config_mistakes(tmp_path, training_cache, overrides, fragment):
    from conftest import train_config

    assert_train_error(run_train(tmp_path, training_cache, train_config(**overrides)), tmp_path, fragment)


def test_train_into_a_run_folder_of_another_config(tmp_path, training_cache):
    from conftest import train_config

    (tmp_path / "run").mkdir()
    record = {"identity": {"config_hash": "sha256:other", "cache": {}}, "complete": False, "cache": "/elsewhere"}
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    assert_train_error(run_train(tmp_path, training_cache, train_config()), tmp_path, "different config or inputs")


def test_resume_with_nothing_to_resume(tmp_path, training_cache):
    from conftest import train_config

    assert_train_error(
        run_train(tmp_path, training_cache, train_config(), "--resume", "auto"), tmp_path, "nothing to resume"
    )
