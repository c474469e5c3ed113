"""The exported student's model card: Hub metadata that parses, the teachers, the cache identity, the vocabulary,
the config, and after `mdkd eval` the table of eval.json; the folder still loads with fill-mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import train, train_config

from mdkd.cli import cli
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.files import content_hash


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training_cache) -> tuple[Path, str]:
    """A tiny run (held-out documents for eval) and its model card as train wrote it."""
    tmp_path = tmp_path_factory.mktemp("card")
    result = train(tmp_path, training_cache, train_config(train={"steps": 4, "eval_fraction": 0.3}))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    return run, (run / "student" / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    run, _ = trained
    result = CliRunner().invoke(cli, ["eval", str(run), "--max-rows", "40"])
    assert result.exit_code == 0, result.output
    return run


def _table_rows(card: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `heading`, cells stripped (header and rule left out)."""
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_card_metadata_is_valid_hub_metadata(trained):
    from huggingface_hub import ModelCard, ModelCardData, metadata_load

    run, _ = trained
    metadata = metadata_load(run / "student" / "README.md")
    assert metadata == {
        "language": ["de", "ru"],
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": ["mdkd", "knowledge-distillation", "multilingual", "masked-lm"],
    }
    assert ModelCardData(**metadata).to_dict() == metadata
    card = ModelCard.load(run / "student" / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and "license" not in card.data.to_dict()


def test_the_card_names_the_teachers_the_cache_the_vocabulary_and_the_config(trained, training_cache):
    from transformers import AutoTokenizer

    run, card = trained
    manifest = CacheReader(training_cache).manifest
    teachers = {row[0].strip("`"): row for row in _table_rows(card, "Teachers")}
    assert set(teachers) == {"de_bert", "multi_xlmr"}
    for name, row in teachers.items():
        entry = manifest.teachers[name]
        assert row[1] == f"`{entry.model}`" and row[3] == f"`{entry.weights}`" and row[4] == entry.architecture
    assert teachers["de_bert"][5] == "de" and teachers["multi_xlmr"][5] == "de, ru"
    assert f"`{content_hash(manifest.identity)}`" in card and manifest.identity["config_hash"] in card
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert f"## Vocabulary\n\n{len(tokenizer)} tokens:" in card
    stats = json.loads((run / "vocab" / "stats.json").read_text())
    vocabulary = {row[0].strip("`"): row for row in _table_rows(card, "Vocabulary")}
    for name, row in vocabulary.items():
        assert int(row[1]) == stats["teachers"][name]["vocab_size"]
        assert 0 < int(row[3]) <= int(row[2]) <= len(tokenizer)
    assert "From scratch" in card and "Not evaluated yet" in card
    assert "```yaml\n" in card and "  steps: 4\n" in card


def test_the_card_is_the_same_bytes_when_written_again(trained, training_cache, tmp_path):
    from mdkd.pipeline.distill.model_card import render_model_card
    from mdkd.pipeline.distill.run import RunFolder

    run, card = trained
    copy = shutil.copytree(run, tmp_path / "run")  # another folder of the same name: the same card
    assert render_model_card(RunFolder(copy), CacheReader(training_cache).manifest) == card


def test_eval_puts_its_per_language_table_into_the_card(evaluated):
    card = (evaluated / "student" / "README.md").read_text(encoding="utf-8")
    report = json.loads((evaluated / "eval.json").read_text())
    rows = _table_rows(card, "Evaluation")
    expected = []
    for language in sorted(report["languages"]):
        result = report["languages"][language]
        entries = list(result["windows"].items())
        if len(entries) > 1:
            entries.append(("all: " + "+".join(result["teachers"]), result["summary"]))
        for name, scored in entries:
            expected.append((language, name, scored))
    assert [(row[0], row[1]) for row in rows] == [(language, name) for language, name, _ in expected]
    assert {row[0] for row in rows} == {"de", "ru"}
    for index, (row, (language, _, scored)) in enumerate(zip(rows, expected, strict=True)):
        masked = scored["by_kind"]["mask"]
        assert int(row[2]) == masked["positions"]
        assert float(row[3]) == pytest.approx(masked["model"]["accuracy"], rel=1e-5)
        assert float(row[4]) == pytest.approx(masked["teacher"]["accuracy"], rel=1e-5)
        assert float(row[6]) == pytest.approx(scored["model"]["accuracy"], rel=1e-5)
        assert float(row[7]) == pytest.approx(scored["teacher"]["accuracy"], rel=1e-5)
        assert float(row[8]) == pytest.approx(scored["model"]["perplexity"], rel=1e-5)
        if index == 0 or rows[index - 1][0] != language:  # raw text: once per language, on its first row
            assert float(row[10]) == pytest.approx(report["languages"][language]["raw_text"]["accuracy"], rel=1e-5)
        else:
            assert row[10] == ""
    assert "Not evaluated yet" not in card


def test_the_student_with_its_card_still_loads_with_fill_mask(evaluated):
    from transformers import AutoModelForMaskedLM, pipeline

    folder = evaluated / "student"
    assert (folder / "README.md").exists()
    model = AutoModelForMaskedLM.from_pretrained(folder)
    filled = pipeline("fill-mask", model=str(folder))("Der Hund [MASK] schnell.", top_k=3)
    assert model.config.model_type == "bert" and len(filled) == 3 and all(f["token_str"] for f in filled)


def test_an_inheriting_students_card_names_its_body_and_rows(tmp_path, training_cache):
    config = train_config(train={"steps": 2, "checkpoint_every": 2})
    config["student"] = {"init": {"teacher": "multi_xlmr"}}
    result = train(tmp_path, training_cache, config)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "run" / "student" / "README.md").read_text(encoding="utf-8")
    stats = json.loads((tmp_path / "run" / "inheritance.json").read_text())
    rows = ", ".join(f"{count} {path}" for path, count in stats["rows"].items())
    assert f"Inherited from teacher `multi_xlmr`: layers {stats['layers']} of its body" in card
    assert f"the vocabulary rows were made as {rows}." in card and "From scratch" not in card
