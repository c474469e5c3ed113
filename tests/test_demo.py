"""`mdkd demo` in miniature (every step, a few documents and steps), and the fortunes corpus builder."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_documents
from mdkd.demo import fortunes
from mdkd.pipeline.errors import UserError
from mdkd.stages import demo

TINY = demo.DemoSettings(documents=80, mono_vocab=200, multi_vocab=300, mono_steps=4, multi_steps=4, student_steps=4,
                         batch_size=8, eval_fraction=0.2, hidden=32, layers=1, heads=2)


def test_fortunes_are_split_cleaned_deduplicated_and_sampled(tmp_path):
    base = tmp_path / "de" / "usr" / "share" / "games" / "fortunes" / "de"
    (base / "off").mkdir(parents=True)
    (base / "witze").write_text(
        "Ein Mathematiker und ein Physiker\nsitzen im Zug.\n%\n\x1b[33mFarbig\x1b[m und\tmit\x07 Steuerzeichen, lang genug.\n"
        "%\nkurz\n%\nEin Mathematiker und ein Physiker sitzen im Zug.\n%\n", encoding="utf-8")
    (base / "witze.dat").write_bytes(b"\x00\x01binary index")
    (base / "off" / "derb").write_text("Etwas Derbes, das hier nicht hingehört.\n%\n", encoding="utf-8")
    found = fortunes.cookies(tmp_path / "de")
    assert found == ["Ein Mathematiker und ein Physiker sitzen im Zug.", "Farbig und mit Steuerzeichen, lang genug.",
                     "Ein Mathematiker und ein Physiker sitzen im Zug."]
    assert sorted(fortunes.sample(found, 10)) == sorted(set(found))
    assert fortunes.sample(found, 1) == fortunes.sample(list(reversed(found)), 1)


def test_without_apt_the_demo_asks_for_a_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(fortunes.shutil, "which", lambda tool: None)
    with pytest.raises(UserError, match="give --corpus DIR"):
        fortunes.fetch_packages(["de"], tmp_path)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    corpus = root / "corpus"
    corpus.mkdir()
    for language in ("de", "en", "ru"):
        (corpus / f"{language}.txt").write_text("\n".join(make_documents(language, 80, seed=3)) + "\n", encoding="utf-8")
    result = demo.run(root / "work", corpus, quick=True, settings=TINY)
    return root, result


def test_the_miniature_demo_runs_every_step(miniature):
    root, result = miniature
    work = root / "work" / "quick"
    assert sorted(p.name for p in (work / "teachers").iterdir()) == ["de_bert", "en_bert", "multi_xlmr", "ru_bert"]
    assert json.loads((work / "cache" / "manifest.json").read_text())["complete"]
    for student in ("mono_taught", "multi_taught", "both_taught", "mlm_only"):
        assert json.loads((work / "runs" / student / "run.json").read_text())["complete"]
        assert set(json.loads((work / "runs" / student / "eval.json").read_text())["languages"]) <= {"de", "en", "ru"}
    assert (work / "report" / "accuracy.png").stat().st_size > 10_000
    assert "Held-out masked-token accuracy" in result["summary"] and "mlm_only" in result["summary"]
    config = yaml.safe_load((work / "configs" / "mlm_only.yaml").read_text())
    assert config["loss"]["alpha"] == {"schedule": "constant", "start": 0.0}


def test_rerunning_the_demo_skips_finished_steps(miniature):
    root, _ = miniature
    work = root / "work" / "quick"
    stamps = {p: p.stat().st_mtime_ns for p in [work / "teachers" / "de_bert" / "config.json", work / "cache" / "manifest.json",
                                                 work / "runs" / "mono_taught" / "metrics.jsonl"]}
    demo.run(root / "work", root / "corpus", quick=True, settings=TINY)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_other_settings_in_the_same_workdir_are_refused(miniature):
    root, _ = miniature
    with pytest.raises(UserError, match="holds a demo with a different config"):
        demo.run(root / "work", root / "corpus", quick=True, settings=demo.QUICK)
