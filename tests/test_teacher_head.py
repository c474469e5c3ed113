"""A teacher must bring its own trained masked-LM head, and loading it keeps the console quiet off a terminal.

A checkpoint without the head (an encoder saved as `BertModel`) loads as `BertForMaskedLM` with a random head;
caching its predictions would distil noise, so stage one refuses it in one line before writing any shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cache_config, sentences, write_config
from safetensors.torch import load_file, save_file
from test_bad_input import assert_one_line_error, run
from transformers import AutoConfig, AutoModel, BertForPreTraining, BertModel
from transformers.utils import logging as transformers_logging

from mdkd.pipeline.errors import UserError
from mdkd.pipeline.teacher_pass.config import TeacherSpec
from mdkd.pipeline.teacher_pass.teachers import Teacher, inspect_teacher
from mdkd.tiny_models import ARCHITECTURES, build_masked_lm, train_tokenizer


def drop_weights(source: Path, target: Path, drop) -> Path:
    """A copy of checkpoint `source` (weights, config, tokenizer) without the weights for which `drop(key)` holds."""
    target.mkdir()
    for path in source.iterdir():
        if path.name != "model.safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    weights = load_file(source / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not drop(k)}, target / "model.safetensors", metadata={"format": "pt"}
    )
    return target


def load(folder: Path, **spec) -> Teacher:
    info, problems = inspect_teacher(TeacherSpec(name="t", model=str(folder), languages=["de"], **spec), 5, 32)
    assert not problems, problems
    return Teacher(info, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "wordpiece": train_tokenizer("wordpiece", sentences("de"), 200, root / "wordpiece"),
        "unigram": train_tokenizer("unigram", sentences("de") + sentences("ru"), 200, root / "unigram"),
    }


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_masked_lm_loads_and_its_encoder_alone_is_refused(tmp_path, tokenizers, model_type):
    tokenizer = tokenizers["unigram" if model_type in ("xlm-roberta", "roberta", "deberta-v2") else "wordpiece"]
    model = build_masked_lm(model_type, tokenizer, tmp_path / "mlm")
    # The decoder tied to the input embeddings is not in the file, and transformers does not call it missing.
    assert load(tmp_path / "mlm").model.config.model_type == model.config.model_type

    AutoModel.from_config(model.config).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(UserError, match=r"has no masked-LM head: \d+ weights? of \w+ (are|is) newly initialised"):
        load(tmp_path / "encoder")


def test_loading_restores_the_transformers_console(teachers_dir):
    before = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    load(teachers_dir / "de_bert")
    assert (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()) == before


@pytest.mark.parametrize(
    "drop, fragment",
    [
        # The head's own bias survives but its transform is gone: still no usable head.
        (lambda key: key.startswith("cls.") and key != "cls.predictions.bias", "has no masked-LM head: 4 weights"),
        (lambda key: key == "cls.predictions.bias", "has no masked-LM head: 1 weight of BertForMaskedLM is newly"),
        (lambda key: key == "bert.encoder.layer.1.output.dense.weight", "is incomplete: 1 weight of BertForMaskedLM"),
    ],
    ids=["bias-only-head", "no-head-bias", "encoder-weight"],
)
def test_a_checkpoint_missing_weights_is_refused(tmp_path, teachers_dir, drop, fragment):
    with pytest.raises(UserError, match=fragment):
        load(drop_weights(teachers_dir / "de_bert", tmp_path / "partial", drop))


def test_cache_logits_refuses_a_teacher_without_a_head(tmp_path, teachers_dir, corpus_dir):
    encoder = tmp_path / "encoder_only"
    BertModel(AutoConfig.from_pretrained(teachers_dir / "de_bert")).save_pretrained(encoder)
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(encoder)
    config["teachers"][0]["tokenizer"] = str(teachers_dir / "de_bert")
    result = run(tmp_path, config)
    assert_one_line_error(result, tmp_path / "out", f"teacher de_bert: checkpoint {encoder} has no masked-LM head")
    # Six keys are missing, but the decoder bias is the prediction bias: five weights, the first four named.
    assert (
        "5 weights of BertForMaskedLM are newly initialised (cls.predictions.bias, "
        "cls.predictions.transform.LayerNorm.bias, "
        "cls.predictions.transform.LayerNorm.weight, cls.predictions.transform.dense.bias, ...)"
    ) in result.stderr
    assert "give a *ForMaskedLM checkpoint" in result.stderr
    # The head is checked when the first teacher loads: no shard of any teacher was written.
    assert not list((tmp_path / "out").rglob("*.parquet"))


def cache_in_a_process(
    tmp_path: Path, teachers_dir: Path, corpus_dir: Path, teacher: dict, **env
) -> subprocess.CompletedProcess:
    """`mdkd cache-logits` with one German teacher in a real process whose stdout and stderr are pipes."""
    tmp_path.mkdir(exist_ok=True)
    config = cache_config(teachers_dir, corpus_dir, device="cpu")
    config["corpus"] = config["corpus"][:1]
    config["teachers"] = [{"name": "t", "languages": ["de"], **teacher}]
    path = write_config(tmp_path / "c.yaml", config)
    return subprocess.run(
        [sys.executable, "-m", "mdkd", "cache-logits", "--config", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )


def test_no_load_report_or_bars_off_a_terminal(tmp_path, teachers_dir, corpus_dir):
    # A pre-training checkpoint has the MLM head plus weights a masked LM does not use (pooler, next-sentence
    # head): it is a fine teacher, and exactly what transformers writes a load report about.
    pretraining = tmp_path / "pretraining"
    BertForPreTraining.from_pretrained(teachers_dir / "de_bert").save_pretrained(pretraining)
    done = cache_in_a_process(
        tmp_path, teachers_dir, corpus_dir, {"model": str(pretraining), "tokenizer": str(teachers_dir / "de_bert")}
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    for noise in ("Loading weights", "LOAD REPORT", "UNEXPECTED", "[transformers]"):
        assert noise not in console, console
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is True


def remote_code_checkpoint(source: Path, target: Path) -> Path:
    """A copy of BERT checkpoint `source` whose model class ships as Python code beside the weights."""
    drop_weights(source, target, lambda key: False)
    (target / "tiny_remote.py").write_text(
        "from transformers import BertConfig, BertForMaskedLM\n\n\n"
        "class TinyRemoteConfig(BertConfig):\n    model_type = 'tiny-remote'\n\n\n"
        "class TinyRemoteForMaskedLM(BertForMaskedLM):\n    config_class = TinyRemoteConfig\n",
        encoding="utf-8",
    )
    config = json.loads((target / "config.json").read_text())
    config.update(
        model_type="tiny-remote",
        architectures=["TinyRemoteForMaskedLM"],
        auto_map={
            "AutoConfig": "tiny_remote.TinyRemoteConfig",
            "AutoModelForMaskedLM": "tiny_remote.TinyRemoteForMaskedLM",
        },
    )
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def test_remote_code_runs_only_when_the_teacher_allows_it(tmp_path, teachers_dir, corpus_dir):
    remote = remote_code_checkpoint(teachers_dir / "de_bert", tmp_path / "remote")
    config = cache_config(teachers_dir, corpus_dir)
    config["teachers"][0]["model"] = str(remote)
    assert_one_line_error(
        run(tmp_path, config), tmp_path / "out", "needs its own Python code to load (set trust_remote_code: true"
    )

    # transformers copies the code into its modules cache: keep that inside the test's folder.
    done = cache_in_a_process(
        tmp_path / "allowed",
        teachers_dir,
        corpus_dir,
        {"model": str(remote), "trust_remote_code": True},
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "allowed" / "out" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["teachers"]["t"]["architecture"] == "TinyRemoteForMaskedLM"
