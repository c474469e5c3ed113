"""The cache-logits config: strict keys and types, every problem at once, paths, and the shipped examples."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, cache_config, write_config

from mdkd.cli import cli
from mdkd.pipeline.config import ConfigError
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.teacher_pass.config import load_cache_config
from mdkd.stages import validate


def test_valid_config_resolves_paths_and_defaults(tmp_path, teachers_dir, corpus_dir):
    raw = cache_config(teachers_dir, corpus_dir)
    raw["corpus"][0]["path"] = "corpus/de.txt"  # relative to the config file
    del raw["top_k"]
    config = load_cache_config(write_config(tmp_path / "c.yaml", raw))
    assert config.corpus[0].path == str((corpus_dir / "de.txt").resolve())
    assert config.top_k == 8
    assert config.languages() == ["de", "ru"]


def test_every_problem_is_reported_at_once(tmp_path, teachers_dir, corpus_dir):
    raw = cache_config(teachers_dir, corpus_dir, top_k="8", bogus_key=1)
    raw["corpus"].append({"language": "fr", "path": str(tmp_path / "missing.txt")})
    raw["teachers"][0]["model"] = str(tmp_path / "no_such_model")
    raw["masking"]["mask"] = 0.5
    with pytest.raises(ConfigError) as caught:
        load_cache_config(write_config(tmp_path / "c.yaml", raw))
    problems = "\n".join(caught.value.problems)
    assert "bogus_key: unknown key" in problems
    assert "top_k: Input should be a valid integer" in problems
    assert "corpus[2].path: corpus file not found" in problems
    assert "teachers[0].model: folder not found" in problems
    assert "masking: mask + random + keep must sum to 1" in problems
    assert "language 'fr' is served by no teacher" in problems
    assert len(caught.value.problems) == 6


def test_hub_ids_are_kept_for_from_pretrained(tmp_path, corpus_dir):
    raw = cache_config(tmp_path, corpus_dir)
    raw["teachers"] = [{"name": "mbert", "model": "bert-base-multilingual-cased", "languages": ["de", "ru"]}]
    config = load_cache_config(write_config(tmp_path / "c.yaml", raw))
    assert config.teachers[0].model == "bert-base-multilingual-cased"


def test_content_hash_ignores_execution_settings_only(tmp_path, teachers_dir, corpus_dir):
    base = load_cache_config(write_config(tmp_path / "a.yaml", cache_config(teachers_dir, corpus_dir)))
    batching = load_cache_config(
        write_config(tmp_path / "b.yaml", cache_config(teachers_dir, corpus_dir, batch_tokens=64, device="cpu"))
    )
    k = load_cache_config(write_config(tmp_path / "c.yaml", cache_config(teachers_dir, corpus_dir, top_k=3)))
    assert base.content_hash() == batching.content_hash()
    assert base.content_hash() != k.content_hash()


def test_validate_command_lists_problems_and_exits_2(tmp_path, teachers_dir, corpus_dir):
    raw = cache_config(teachers_dir, corpus_dir, max_length=4, extra=True)
    result = CliRunner().invoke(cli, ["validate", str(write_config(tmp_path / "c.yaml", raw))])
    assert result.exit_code == 2
    assert "2 problem(s)" in result.stderr
    assert "max_length" in result.stderr and "extra: unknown key" in result.stderr
    ok = CliRunner().invoke(
        cli, ["validate", str(write_config(tmp_path / "ok.yaml", cache_config(teachers_dir, corpus_dir)))]
    )
    assert ok.exit_code == 0 and "valid cache-logits config" in ok.stdout


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("corpus: [unclosed\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "not valid YAML" in result.stderr


@pytest.mark.parametrize(
    "config_file", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_every_example_config_validates(tmp_path, config_file: Path):
    # Examples name teachers their own make_teachers.py builds; build them in a copy so the repo stays clean.
    copy = tmp_path / config_file.parent.name
    shutil.copytree(config_file.parent, copy, ignore=shutil.ignore_patterns("teachers"))
    if (copy / "make_teachers.py").exists():
        runpy.run_path(str(copy / "make_teachers.py"))
    validate.run(copy / config_file.name)


def test_jsonl_blank_and_null_texts_are_counted_not_fatal(tmp_path):
    from mdkd.pipeline.teacher_pass.config import CorpusSource
    from mdkd.pipeline.teacher_pass.corpus import read_source, scan_source

    path = tmp_path / "de.jsonl"
    path.write_text('{"text": "eins"}\n\n{"text": null}\n{"text": "zwei", "id": 3}\n', encoding="utf-8")
    source = CorpusSource(language="de", path=str(path))
    assert [d.doc_id for d in read_source(source)] == ["de:de.jsonl:1", "de:de.jsonl:4"]
    summary = scan_source(source)
    assert (summary.documents, summary.skipped_blank) == (2, 2)
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(UserError, match="holds int, not text"):
        scan_source(source)


def test_a_negative_training_seed_is_a_config_problem(tmp_path):
    # Each example draws from default_rng([seed, index]), which takes no negative seed: refused before training.
    path = write_config(tmp_path / "t.yaml", {"train": {"steps": 3, "seed": -1}})
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert "train.seed: Input should be greater than or equal to 0" in result.stderr
