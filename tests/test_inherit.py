"""A student that inherits a teacher's weights (student.init): checked against the body itself, loaded and run by
transformers on its own ids, not against inherit.py's algebra."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    cache_config,
    make_documents,
    metrics,
    sentences,
    torchrun,
    train,
    train_config,
    unfinished_copy,
    write_config,
)
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from mdkd.cli import cli
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.config import InheritConfig
from mdkd.pipeline.distill.inherit import PATHS, inherit_student
from mdkd.pipeline.distill.vocab import Alignment, TeacherVocabulary, build_alignment
from mdkd.tiny_models import build_masked_lm, train_tokenizer

BODIES = ("de_bert", "multi_xlmr", "ru_modern")
# The other architectures a teacher can have, each a German body of its own.
OTHER_BODIES = {
    "de_roberta": ("roberta", "bytelevel"),
    "de_distil": ("distilbert", "wordpiece"),
    "de_albert": ("albert", "unigram"),
    "de_deberta": ("deberta-v2", "unigram"),
}


@pytest.fixture(scope="module")
def bodies(tmp_path_factory) -> dict:
    """Teachers of every architecture mdkd reads and one cache of them all: a German WordPiece BERT, a
    multilingual Unigram XLM-R, a three-layer Russian WordPiece ModernBERT (whose tokenizer turns German letters it
    never saw into [UNK], so some merged tokens take the fallback row), and German bodies of the other four."""
    root = tmp_path_factory.mktemp("bodies")
    german, russian = sentences("de"), sentences("ru")
    build_masked_lm("bert", train_tokenizer("wordpiece", german, 300, root / "de_bert"), root / "de_bert", seed=1)
    every = german + sentences("en") + russian
    build_masked_lm(
        "xlm-roberta", train_tokenizer("unigram", every, 400, root / "multi_xlmr"), root / "multi_xlmr", seed=2
    )
    russian_tokenizer = train_tokenizer("wordpiece", russian, 300, root / "ru_modern")
    build_masked_lm("modernbert", russian_tokenizer, root / "ru_modern", seed=3, layers=3)
    for seed, (name, (architecture, family)) in enumerate(OTHER_BODIES.items(), start=4):
        build_masked_lm(architecture, train_tokenizer(family, german, 300, root / name), root / name, seed=seed)
    (root / "de.txt").write_text("\n".join(make_documents("de", 30, seed=5)) + "\n", encoding="utf-8")
    (root / "ru.txt").write_text("\n".join(make_documents("ru", 30, seed=5)) + "\n", encoding="utf-8")
    config = cache_config(root, root, top_k=8, shard_documents=16)
    config["teachers"].append({"name": "ru_modern", "model": str(root / "ru_modern"), "languages": ["ru"]})
    config["teachers"] += [{"name": name, "model": str(root / name), "languages": ["de"]} for name in OTHER_BODIES]
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(root / "cache.yaml", config)), "--out", str(root / "cache")]
    )
    assert result.exit_code == 0, result.output
    cache = CacheReader(root / "cache")
    alignment = build_alignment([TeacherVocabulary.from_cache(cache, name) for name in cache.manifest.teachers])
    return {"root": root, "cache": cache, "alignment": alignment}


def inherited(bodies, body: str, layers=None):
    cache, alignment = bodies["cache"], bodies["alignment"]
    return inherit_student(InheritConfig(teacher=body, layers=layers), cache, alignment, cache.manifest.shards, 0)


def body_model(bodies, body: str):
    return AutoModelForMaskedLM.from_pretrained(bodies["root"] / body).eval()


@pytest.mark.parametrize("body", [*BODIES, *OTHER_BODIES])
def test_inherited_student_predicts_like_its_body_before_any_step(bodies, body):
    """On every window the body cached (its own ids into the body, the same ids mapped into the merged vocabulary
    into the student), the logits at each merged token exactly one body id maps to are the body's, and the
    student's top-1 over the whole merged vocabulary is the body's top-1 at >= 99 % of masked positions."""
    cache, alignment = bodies["cache"], bodies["alignment"]
    student, reference = inherited(bodies, body).model.eval(), body_model(bodies, body)
    id_map = alignment.id_maps[body].astype(np.int64)
    preimages = np.bincount(id_map[id_map >= 0], minlength=len(alignment.tokens))
    single = np.array([b for b, s in enumerate(id_map) if s >= 0 and preimages[s] == 1])
    largest, agree, total = 0.0, 0, 0
    for shard in cache.manifest.shards_of(body):
        rows = cache.rows(shard)
        for index in range(len(rows)):
            row = rows.row(index)
            ids = torch.tensor(row.input_ids, dtype=torch.long)[None]
            positions = torch.tensor(row.positions, dtype=torch.long)
            ones = torch.ones_like(ids)
            with torch.no_grad():
                expected = reference(input_ids=ids, attention_mask=ones).logits[0, positions]
                got = student(input_ids=torch.from_numpy(id_map[row.input_ids])[None], attention_mask=ones).logits
            got = got[0, positions]
            largest = max(largest, (got[:, id_map[single]] - expected[:, single]).abs().max().item())
            body_top = id_map[expected[:, : len(id_map)].argmax(-1).numpy()]
            agree += int((got.argmax(-1).numpy() == body_top).sum())
            total += len(positions)
    assert total > 500
    assert largest < 1e-5
    assert agree / total >= 0.99, agree / total


@pytest.mark.parametrize(("body", "layers"), [("de_bert", [1]), ("ru_modern", [0, 2])])
def test_kept_layers_are_exactly_the_picked_ones(bodies, body, layers):
    student = inherited(bodies, body, layers).model
    reference = body_model(bodies, body)
    stack = "bert.encoder.layer" if body == "de_bert" else "model.layers"
    assert student.config.num_hidden_layers == len(layers)
    got, expected = student.state_dict(), reference.state_dict()
    for new_index, old_index in enumerate(layers):
        names = [name for name in expected if name.startswith(f"{stack}.{old_index}.")]
        assert names
        for name in names:
            torch.testing.assert_close(got[name.replace(f".{old_index}.", f".{new_index}.", 1)], expected[name])
    assert not any(name.startswith(f"{stack}.{len(layers)}.") for name in got)
    if body == "ru_modern":  # ModernBERT's local/global pattern goes with the layers picked
        assert student.config.layer_types == [reference.config.layer_types[i] for i in layers]
        assert student.config.local_attention == reference.config.local_attention == 16


def test_a_new_token_takes_the_mean_of_its_pieces_rows(bodies):
    """A German word-start token that the XLM-R body lacks: its input row (and so its output row, tied) is the mean
    of the body's rows of the pieces its own tokenizer (the teacher folder's) cuts its text into, and its output
    bias their mean less log(1 + pieces)."""
    alignment = bodies["alignment"]
    tokenizer = AutoTokenizer.from_pretrained(bodies["root"] / "multi_xlmr")
    body_tokens = set(alignment.tokens[i] for i in alignment.id_maps["multi_xlmr"] if i >= 0)
    candidates = [
        t for t in (alignment.tokens[i] for i in alignment.id_maps["de_bert"]) if t not in body_tokens and len(t) > 3
    ]
    candidates = [t for t in candidates if not t.startswith("##") and not t.startswith("[")]
    assert candidates
    reference = body_model(bodies, "multi_xlmr")
    inheritance = inherited(bodies, "multi_xlmr")
    student = inheritance.model
    checked = 0
    for token in candidates[:5]:
        pieces = [i for i in tokenizer(token, add_special_tokens=False)["input_ids"] if i != tokenizer.unk_token_id]
        student_id = alignment.tokens.index(token)
        assert PATHS[inheritance.paths[student_id]] == "pieces"
        expected = reference.get_input_embeddings().weight[pieces].mean(0)
        torch.testing.assert_close(student.get_input_embeddings().weight[student_id], expected)
        expected_bias = reference.lm_head.bias[pieces].mean(0) - np.log1p(len(pieces))
        torch.testing.assert_close(student.lm_head.bias[student_id], expected_bias)
        checked += 1
    assert checked


def test_a_token_the_body_cannot_spell_takes_the_mean_row_and_a_frequency_bias(bodies):
    """German tokens the Russian body's tokenizer gives only [UNK] for: the body's mean row over its ordinary
    tokens, and its mean output bias plus the log of the token's add-one share of the cached inputs (counted here
    from the shards' own columns)."""
    cache, alignment = bodies["cache"], bodies["alignment"]
    inheritance = inherited(bodies, "ru_modern")
    fallback = np.flatnonzero(inheritance.paths == PATHS.index("fallback"))
    assert len(fallback) > 10
    counts = np.zeros(len(alignment.tokens))
    for shard in cache.manifest.shards:
        table = pq.read_table(cache.dir / shard.path, columns=["input_ids", "positions", "labels"])
        id_map = alignment.id_maps[shard.teacher]
        for ids, positions, labels in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
            ids = np.array(ids)
            ids[positions] = labels
            np.add.at(counts, id_map[ids], 1)
    reference = body_model(bodies, "ru_modern")
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    tokenizer = AutoTokenizer.from_pretrained(bodies["root"] / "ru_modern")
    ordinary = [i for token, i in tokenizer.get_vocab().items() if token not in specials]
    student = inheritance.model
    expected_row = reference.get_input_embeddings().weight[ordinary].mean(0)
    mean_bias = reference.decoder.bias[ordinary].mean()
    for student_id in fallback[:20]:
        torch.testing.assert_close(student.get_input_embeddings().weight[student_id], expected_row)
        share = (counts[student_id] + 1) / (counts.sum() + len(counts))
        torch.testing.assert_close(student.decoder.bias[student_id].item(), (mean_bias + np.log(share)).item())


@pytest.fixture
def copied_body_cache(tmp_path, teachers_dir, corpus_dir):
    """A cache whose XLM-R teacher is a copy in tmp_path, which the tests may change after caching."""
    body = tmp_path / "body"
    shutil.copytree(teachers_dir / "multi_xlmr", body)
    config = cache_config(teachers_dir, corpus_dir, top_k=8)
    config["teachers"] = [{"name": "multi_xlmr", "model": str(body), "languages": ["de", "ru"]}]
    result = CliRunner().invoke(
        cli, ["cache-logits", "--config", str(write_config(tmp_path / "c.yaml", config)), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "c", body


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


def inherit_config(body: str = "multi_xlmr", zero_stage: int = 0, **student) -> dict:
    config = train_config(train={"steps": 2, "checkpoint_every": 2}, zero_stage=zero_stage)
    config["student"] = {"init": {"teacher": body}, **student}
    return config


def test_changed_body_weights_are_refused_by_train_and_validate(tmp_path, copied_body_cache):
    cache, body = copied_body_cache
    model = AutoModelForMaskedLM.from_pretrained(body)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] += 1.0
    model.save_pretrained(body)
    result = train(tmp_path, cache, inherit_config())
    one_line_error(result, "are not the ones stage one cached")
    assert not (tmp_path / "run").exists()
    path = write_config(tmp_path / "v.yaml", inherit_config())
    result = CliRunner().invoke(cli, ["validate", str(path), "--cache", str(cache)])
    assert result.exit_code == 2 and "are not the ones stage one cached" in result.stderr, result.output


def test_a_body_not_in_the_cache_and_contradicting_sizes_are_refused(tmp_path, training_cache):
    one_line_error(train(tmp_path, training_cache, inherit_config("nobody")), "'nobody' is not in the cache")
    result = train(tmp_path, training_cache, inherit_config(hidden_size=64, num_layers=5, architecture="modernbert"))
    one_line_error(result, "with init the body decides the sizes")
    for fragment in (
        "hidden_size 64 (the body's is 32)",
        "num_layers 5 (the body's is 2)",
        "architecture modernbert (the body is xlm-roberta)",
    ):
        assert fragment in result.stderr
    result = train(tmp_path, training_cache, inherit_config(init={"teacher": "multi_xlmr", "layers": [0, 2]}))
    one_line_error(result, "names layer 2, but the body has 2")


@pytest.mark.parametrize(
    ("body", "exported"), [("multi_xlmr", "XLMRobertaForMaskedLM"), ("de_bert", "BertForMaskedLM")]
)
def test_inherited_run_exports_the_body_architecture_that_transformers_loads(tmp_path, training_cache, body, exported):
    result = train(tmp_path, training_cache, inherit_config(body, zero_stage=2))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    stats = json.loads((run / "inheritance.json").read_text())
    alignment = Alignment.load(run / "vocab", ["de_bert", "multi_xlmr"])
    assert stats["body"] == body and stats["layers"] == [0, 1]
    assert sum(stats["rows"].values()) == len(alignment.tokens) and stats["rows"]["own"] > 0
    assert f"student inherits {body}" in result.output
    model = AutoModelForMaskedLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert type(model).__name__ == exported and model.config.vocab_size == len(alignment.tokens)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    filled = pipeline("fill-mask", model=model, tokenizer=tokenizer)("Der Hund [MASK] schnell.", top_k=3)
    assert len(filled) == 3
    # The run's resolved config (every default written out) is a valid config of the same run.
    again = CliRunner().invoke(cli, ["validate", str(run / "config.yaml"), "--cache", str(training_cache)])
    assert again.exit_code == 0 and f"student inherits {body}" in again.output, again.output


def test_inherited_modernbert_student_trains_on_two_ranks_with_zero_3(tmp_path, bodies):
    import subprocess

    config = inherit_config("ru_modern", zero_stage=3)
    config["teachers"] = {"de": "de_bert", "ru": ["multi_xlmr", "ru_modern"]}
    path = write_config(tmp_path / "run.yaml", config)
    command = torchrun("-m", "mdkd", "train", "--config", str(path), "--cache", str(bodies["root"] / "cache"))
    result = subprocess.run([*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student")
    reference = body_model(bodies, "ru_modern")
    assert type(model).__name__ == "ModernBertForMaskedLM"
    assert model.config.layer_types == reference.config.layer_types and model.config.local_attention == 16
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert "token_type_ids" not in tokenizer("Привет мир")


def test_a_body_that_teaches_nothing_gives_its_rows_to_the_tokens_it_shares(bodies):
    """MergeDistill's setting: the multilingual body under a monolingual teacher. The merged vocabulary is the
    teacher's; each of its tokens that the body spells once takes that body id's rows."""
    cache = bodies["cache"]
    german = TeacherVocabulary.from_cache(cache, "de_bert")
    body = TeacherVocabulary.from_cache(cache, "multi_xlmr")
    alignment = build_alignment([german])
    inheritance = inherit_student(InheritConfig(teacher="multi_xlmr"), cache, alignment, cache.manifest.shards, 0)
    reference = body_model(bodies, "multi_xlmr")
    spelled = {}
    for body_id, token in enumerate(body.canonical):
        spelled.setdefault(token, []).append(body_id)
    shared = [(i, spelled[t][0]) for i, t in enumerate(alignment.tokens) if len(spelled.get(t, [])) == 1]
    assert len(shared) > 50
    rows = torch.tensor([student_id for student_id, _ in shared])
    body_rows = torch.tensor([body_id for _, body_id in shared])
    torch.testing.assert_close(
        inheritance.model.get_input_embeddings().weight[rows], reference.get_input_embeddings().weight[body_rows]
    )
    assert (inheritance.paths[rows.numpy()] == PATHS.index("own")).all()
    assert inheritance.model.config.vocab_size == len(alignment.tokens)


def test_a_resumed_inherited_run_continues_as_the_uninterrupted_one(tmp_path, training_cache):
    """The resumed student is the checkpoint's, not the body again: its metrics and exported weights are the
    uninterrupted run's."""
    config = inherit_config()
    config["train"] = {**config["train"], "steps": 4, "checkpoint_every": 2}
    config["student"]["init"]["layers"] = [1]
    assert train(tmp_path, training_cache, config).exit_code == 0
    crashed = unfinished_copy(tmp_path / "run", tmp_path / "crashed", died_after=3, last_checkpoint=2)
    resumed = train(tmp_path, training_cache, config, "crashed", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    for a, b in zip(metrics(tmp_path / "run")[2:], metrics(crashed)[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    whole = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "student").state_dict()
    again = AutoModelForMaskedLM.from_pretrained(crashed / "student").state_dict()
    assert whole.keys() == again.keys()
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], atol=1e-6, rtol=0)


def test_inheritance_benchmark_reports_every_student_on_every_window(tmp_path, training_cache):
    """bench/inheritance.py end to end on a small cache (a smoke run: the teachers here have random weights)."""
    import subprocess
    import sys
    from pathlib import Path

    config = train_config(teachers={"de": "de_bert", "ru": "multi_xlmr"}, train={"steps": 2, "checkpoint_every": 2})
    path = write_config(tmp_path / "scratch.yaml", config)
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "bench/inheritance.py", "--cache", str(training_cache), "--config", str(path)]
    command += ["--body", "multi_xlmr", "--out", str(tmp_path / "bench"), "--sentence", "Der Hund [MASK] schnell."]
    # This process's own process group (from the in-process runs) must not leak its rendezvous into the bench's.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {key: value for key, value in os.environ.items() if key not in launcher}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    students = ("inherited_step0", "inherited_kd", "inherited_mlm", "scratch_kd")
    assert set(figures["mask_accuracy"]) == set(students)
    windows = figures["mask_accuracy"]["inherited_step0"]
    assert set(windows) == {"de", "ru"} and set(windows["de"]) == {"de_bert", "multi_xlmr"}
    for name in students:
        for language, scored in figures["mask_accuracy"][name].items():
            assert scored.keys() == windows[language].keys()
            for row in scored.values():
                assert row["positions"] > 0 and 0.0 <= row["student"] <= 1.0 and 0.0 <= row["teacher"] <= 1.0
    (filled,) = figures["fill_mask"]
    assert len(filled["body"]) == len(filled["student"]) == 3
