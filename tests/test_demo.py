"""`mdkd demo` in miniature (every step, a few documents and steps), and its corpus builder (on inline samples:
no network, no apt)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess

import pytest
import yaml
from conftest import make_documents

from mdkd.demo import summary
from mdkd.demo.corpus import assemble, fetch, fortunes, help_pages, manpages
from mdkd.demo.corpus.language import is_language, usable
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.errors import UserError
from mdkd.stages import demo

TINY = demo.DemoSettings(
    documents=60,
    teacher_bytes=100_000,
    mono_vocab=200,
    multi_vocab=300,
    mono_steps=4,
    multi_steps=4,
    student_steps=4,
    eval_every=2,
    batch_size=8,
    eval_fraction=0.2,
    hidden=32,
    layers=1,
    heads=2,
)


GERMAN_MAN = r""".\" -*- coding: UTF-8 -*-
.TH LS 1 "September 2022" "GNU coreutils 9.1" "Dienstprogramme für Benutzer"
.SH BEZEICHNUNG
ls \- Verzeichnisinhalte auflisten
.SH BESCHREIBUNG
.PP
Auflistung von Informationen über die \fIDATEIen\fP (Standardvorgabe ist das
aktuelle Verzeichnis). Die Einträge werden alphabetisch sortiert, falls
weder \fB\-cftuvSUX\fP noch
.B \-\-sort
angegeben wurden\(em so einfach ist das.
.TP
\fB\-a\fP, \fB\-\-all\fP
Einträge nicht ignorieren, die mit \(Fo.\(Fc beginnen, siehe
.BR stat (2).
.EX
ls \-la /tmp | sort
.EE
.TS
l l.
Spalte	Wert
.TE
.\" a comment that is not text
.PP
This paragraph was not translated yet, so the English original of the page is shown in its place.
.PP
Weitere Informationen finden Sie unter
.UR https://www.gnu.org/software/coreutils/
der Projektseite
.UE .
"""

RUSSIAN_MAN = r""".TH PROC 5 2022-10-30 "Linux man-pages 6.03"
.SH ОПИСАНИЕ
Файловая система \fIproc\fP является псевдофайловой системой, которая предоставляет интерфейс к структурам
данных ядра.
.PP
The proc filesystem is a pseudo-filesystem which provides an interface to kernel data structures.
"""

HELP_PAGE = """<!DOCTYPE html><html lang="de"><head><title>Makrosicherheit</title><script>var x = 1;</script></head>
<body><header><a class="logo"><p dir="auto">Hilfe für LibreOffice 7.4</p></a></header>
<aside class="leftside">Index</aside>
<div id="DisplayArea"><h1 id="a">Makrosicherheit</h1>
<p class="paragraph">Der Dialog erscheint, wenn ein Dokument Makros enth&auml;lt. Sie können ihn auch über
<span class="switchinline"><span hidden="true" id="MACtextshared_1" class="MAC">LibreOffice – Einstellungen</span><span
hidden="true" id="defaulttextshared_1"><span class="emph">Extras – Optionen…</span></span></span> aufrufen,<br>mit der
Taste <span class="keycode">F1</span> &amp; mehr.</p>
<div class="bascode"><p class="bascode">Sub Main : MsgBox "Hallo" : End Sub</p></div>
<div class="howtoget"><div class="howtogetheader">So greifen Sie auf diesen Befehl zu:</div><div class="howtogetbody">
<p>Wählen Sie Extras – Optionen.</p></div></div>
<table><tr><td><p class="tablecontent">Click here to open the dialog, which was not translated yet.</p>
</td></tr></table></div><div id="SearchFrame"></div>
<footer><div class="debug"><p>Help content debug info: this page is Makrosicherheit.</p></div></footer></body></html>
"""


def test_man_pages_become_plain_paragraphs():
    found = manpages.man_paragraphs(GERMAN_MAN)
    assert (
        "Auflistung von Informationen über die DATEIen (Standardvorgabe ist das aktuelle Verzeichnis). Die "
        "Einträge werden alphabetisch sortiert, falls weder -cftuvSUX noch --sort angegeben wurden— so einfach ist "
        "das."
    ) in found
    # the option tag, the example, the table, the comment and the headings are gone
    assert "Einträge nicht ignorieren, die mit «.» beginnen, siehe stat(2)." in found
    assert not any(text.startswith(("-a", "ls -la", "Spalte", "BEZEICHNUNG", "a comment")) for text in found)
    assert "Weitere Informationen finden Sie unter der Projektseite." in found
    assert not any("\\" in text or "https" in text for text in found)


def test_help_pages_become_plain_paragraphs():
    found = help_pages.help_paragraphs(HELP_PAGE)
    assert found[0] == "Makrosicherheit"
    assert found[1] == (
        "Der Dialog erscheint, wenn ein Dokument Makros enthält. Sie können ihn auch über Extras – "
        "Optionen… aufrufen, mit der Taste F1 & mehr."
    )  # one variant of the switch, <br> a space
    assert "Click here to open the dialog, which was not translated yet." in found
    assert not any(
        word in text
        for text in found
        for word in ("Sub Main", "So greifen", "Wählen Sie", "Hilfe für", "debug", "var x", "Index")
    )


@pytest.mark.parametrize(
    "language, text, expected",
    [
        ("de", "Einträge nicht ignorieren, die mit einem Punkt beginnen.", True),
        ("de", "Wählen Sie Format – Direkte Formatierung löschen.", True),  # one function word, and umlauts
        ("de", "This paragraph was not translated yet, so the English original is shown.", False),
        ("de", "Setzt das ausgewählte Objekt hinter den Text.", True),
        ("de", "Zeigt das Ergebnis der Multiplikation von A1 und A2 an.", True),  # A1 is a cell, not the English `a`
        ("ru", "Файловая система proc является псевдофайловой системой, которая предоставляет интерфейс.", True),
        (
            "ru",
            "The proc filesystem is a pseudo-filesystem which provides an interface to kernel data structures.",
            False,
        ),
        ("ru", "Поля структуры fanotify_event_info_pidfd описаны ниже.", True),  # an identifier is one word
        ("zh", "与 -l 同时使用时，列出每个文件的作者。", True),
        ("zh", "Specifies the properties of the selected table, for example, name and alignment.", False),
        ("zh", "このコマンドはファイルの一覧を表示します。", False),  # Japanese
        ("zh", "《清平调・其三》作者：李白名花倾国两相欢，常得君王带笑看。", True),  # ・ is no kana
        ("en", "Actors will happen even in the best-regulated families. -- Japanese proverb", True),  # one word will do
        ("en", "Die Einträge werden alphabetisch sortiert, falls nichts anderes angegeben ist.", False),
    ],
)
def test_the_language_filter_keeps_a_language_and_drops_english_fallbacks(language, text, expected):
    assert usable(text, language)
    assert is_language(text, language) is expected


def test_short_and_code_like_paragraphs_are_dropped():
    assert not usable("Klicken Sie auf OK.", "de")
    assert not usable("$count = () = $string =~ /\\d+/g; while (<>) { print; }", "en")
    assert not usable("1401, 3c01, 0c01, 801, 2c01, 3401, 3001, 1001, 1801, 2001, 4001, 2801", "en")
    assert usable("列出指定文件的信息，默认为当前目录。", "zh")  # 16 Chinese characters are a sentence


def test_fortunes_are_split_and_cleaned():
    found = fortunes.cookies(
        "Ein Mathematiker und ein Physiker\nsitzen im Zug.\n%\n\x1b[33mFarbig\x1b[m und\tmit\x07 "
        "Steuerzeichen.\n%\n各家自扫门前雪，\n莫管他人瓦上霜。\n%\n"
    )
    assert found == [
        "Ein Mathematiker und ein Physiker sitzen im Zug.",
        "Farbig und mit Steuerzeichen.",
        "各家自扫门前雪，莫管他人瓦上霜。",
        "",
    ]  # no space where a line broke between Chinese characters


def _unpacked(root, language, help_page="", man_page="", cookies=""):
    """Fake unpacked packages of a language (its help, manual pages and fortunes), as fetch_packages leaves them."""
    help_source, man_source, fortunes_source = fetch.SOURCES[language]
    pages = root / help_source.package / help_source.under / "text"
    pages.mkdir(parents=True)
    (pages / "page.html").write_text(help_page, encoding="utf-8")
    manuals = root / man_source.package / man_source.under / "man1"
    manuals.mkdir(parents=True)
    (manuals / "ls.1.gz").write_bytes(gzip.compress(man_page.encode()))
    (manuals / "dir.1.gz").symlink_to("ls.1.gz")  # a link repeats a page: left out
    jokes = root / fortunes_source.package / fortunes_source.under
    (jokes / "off").mkdir(parents=True)
    (jokes / "witze").write_text(cookies, encoding="utf-8")
    (jokes / "witze.dat").write_bytes(b"\x00\x01binary index")
    (jokes / "off" / "derb").write_text(
        "Etwas Derbes, das hier nicht hingehört und nicht in den Korpus soll.\n%\n", encoding="utf-8"
    )
    return [(source, root / source.package) for source in fetch.SOURCES[language]]


GERMAN_COOKIES = (
    "Ein Mathematiker und ein Physiker sitzen im Zug und sehen ein schwarzes Schaf.\n%\n"
    "Der Dialog erscheint, wenn ein Dokument Makros enthält. Sie können ihn auch über Extras – Optionen… "
    "aufrufen, mit der Taste F1 & mehr.\n%\n"  # the help page's paragraph again
    "Nothing is as practical as a good theory, and this cookie says that in English.\n%\n"
)
RUSSIAN_HELP = (
    '<div id="DisplayArea"><p>Диалоговое окно появляется, когда документ содержит макросы.</p>'
    "<p>Click here to open the dialog, which was not translated yet.</p></div>"
)
BILINGUAL = "Учиться, учиться и ещё раз учиться! 学而时习之，不亦说乎？温故而知新，可以为师矣。"


def test_the_corpus_is_filtered_deduplicated_capped_and_deterministic(tmp_path):
    roots = {
        "de": _unpacked(tmp_path / "p", "de", HELP_PAGE, GERMAN_MAN, GERMAN_COOKIES),
        "ru": _unpacked(
            tmp_path / "p",
            "ru",
            RUSSIAN_HELP,
            RUSSIAN_MAN,
            f"Где любовь - там и слёзы, а где слёзы - там и любовь. -- Ихара Сайкаку\n%\n{BILINGUAL}\n",
        ),
        "zh": _unpacked(tmp_path / "p", "zh", cookies=f"各家自扫门前雪，莫管他人瓦上霜。 --《谚语》\n%\n{BILINGUAL}\n"),
    }
    stats = assemble.write_corpus(roots, tmp_path / "a")
    text = {
        language: (tmp_path / "a" / f"{language}.txt").read_text(encoding="utf-8").splitlines() for language in roots
    }
    assert sorted(text["de"]) == sorted(
        [
            "Auflistung von Informationen über die DATEIen (Standardvorgabe ist "
            "das aktuelle Verzeichnis). Die Einträge "
            "werden alphabetisch sortiert, falls weder -cftuvSUX noch --sort angegeben wurden— so einfach ist das.",
            "Einträge nicht ignorieren, die mit «.» beginnen, siehe stat(2).",
            "Weitere Informationen finden Sie unter der Projektseite.",
            "Der Dialog erscheint, wenn ein Dokument Makros enthält. Sie können "
            "ihn auch über Extras – Optionen… aufrufen, "
            "mit der Taste F1 & mehr.",
            "Ein Mathematiker und ein Physiker sitzen im Zug und sehen ein schwarzes Schaf.",
        ]
    )  # no English, nothing from off/, the help page's paragraph once
    assert sorted(text["ru"]) == sorted(
        [
            "Диалоговое окно появляется, когда документ содержит макросы.",
            "Файловая система proc является псевдофайловой системой, которая "
            "предоставляет интерфейс к структурам данных "
            "ядра.",
            "Где любовь - там и слёзы, а где слёзы - там и любовь. -- Ихара Сайкаку",
        ]
    )  # the bilingual cookie passes both languages' filters, so it is in neither
    assert text["zh"] == ["各家自扫门前雪，莫管他人瓦上霜。 --《谚语》"]
    assert {key: stats["de"][key] for key in ("documents", "wrong_language", "duplicates")} == {
        "documents": 5,
        "wrong_language": 3,
        "duplicates": 1,
    }  # English from the help, the page and the cookies
    assert stats["de"]["bytes"] == (tmp_path / "a" / "de.txt").stat().st_size
    assert (stats["ru"]["wrong_language"], stats["ru"]["duplicates"], stats["zh"]["duplicates"]) == (2, 1, 1)
    assert stats["de"]["packages"] == ["libreoffice-help-de", "manpages-de", "fortunes-de"]

    again = assemble.write_corpus(dict(reversed(roots.items())), tmp_path / "b")
    assert again == stats
    for language in roots:
        assert (tmp_path / "a" / f"{language}.txt").read_bytes() == (tmp_path / "b" / f"{language}.txt").read_bytes()

    capped = assemble.write_corpus(roots, tmp_path / "c", documents_per_language=2)
    assert capped["de"]["documents"] == 2
    assert (tmp_path / "c" / "de.txt").read_text(encoding="utf-8").splitlines() == text["de"][:2]  # a prefix
    budget = len("\n".join(text["de"][:3]).encode()) + 1
    by_bytes = assemble.write_corpus(roots, tmp_path / "d", bytes_per_language=budget + 5)
    assert (tmp_path / "d" / "de.txt").read_text(encoding="utf-8").splitlines() == text["de"][:3]
    assert by_bytes["de"]["bytes"] == budget


def test_sampling_does_not_depend_on_input_order():
    documents = [f"Dokument Nummer {index} mit etwas Text" for index in range(50)]
    assert assemble.sample(documents, 10) == assemble.sample(list(reversed(documents)), 10)
    assert assemble.sample(documents + documents) == assemble.sample(documents)


def test_unpacked_packages_are_not_fetched_again(tmp_path, monkeypatch):
    for source in fetch.SOURCES["de"]:
        (tmp_path / source.package / "usr").mkdir(parents=True)
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    roots = fetch.fetch_packages(["de"], tmp_path)
    assert [source.package for source, _ in roots["de"]] == ["libreoffice-help-de", "manpages-de", "fortunes-de"]


def test_without_apt_lists_the_demo_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(
        fetch.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a[0], 100, "", "E: Unable to locate package libreoffice-help-de\n"),
    )
    with pytest.raises(UserError, match=r"apt-get update.*give --corpus DIR"):
        fetch.fetch_packages(["de"], tmp_path)


def test_without_apt_the_demo_asks_for_a_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)
    with pytest.raises(UserError, match="give --corpus DIR"):
        fetch.fetch_packages(["de"], tmp_path)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    given = root / "corpus"
    given.mkdir()
    for language in ("de", "en", "ru"):
        (given / f"{language}.txt").write_text("\n".join(make_documents(language, 80, seed=3)) + "\n", encoding="utf-8")
    result = demo.run(root / "work", given, quick=True, settings=TINY)
    return root, result


def test_the_miniature_demo_runs_every_step(miniature):
    root, result = miniature
    work = root / "work" / "quick"
    assert sorted(p.name for p in (work / "teachers").iterdir()) == ["de_mono", "en_mono", "multi", "ru_mono"]
    assert json.loads((work / "cache" / "manifest.json").read_text())["complete"]
    students = ("mono_taught", "multi_taught", "both_taught", "mlm_only", *summary.INHERITED)
    assert sorted(p.name for p in (work / "runs").iterdir()) == sorted(students)
    for student in students:
        assert json.loads((work / "runs" / student / "run.json").read_text())["complete"]
        assert set(json.loads((work / "runs" / student / "eval.json").read_text())["languages"]) <= {"de", "en", "ru"}
        # The lead table's evaluation: every teacher's windows, whatever the student was taught by.
        every = json.loads((work / "report" / demo.EVERY_TEACHER / f"{student}.json").read_text())
        assert every["scope"] == "all cached teachers"
        assert {window for result in every["languages"].values() for window in result["windows"]} == {
            "de_mono",
            "en_mono",
            "ru_mono",
            "multi",
        }
    for inherited in summary.INHERITED:
        config = yaml.safe_load((work / "configs" / f"{inherited}.yaml").read_text())
        assert config["student"] == {"init": {"teacher": "multi"}}
        assert config["teachers"] == {language: f"{language}_mono" for language in ("de", "en", "ru")}
        assert RunFolder(work / "runs" / inherited).inheritance()["body"] == "multi"
    assert (work / "report" / "accuracy.png").stat().st_size > 10_000
    assert (work / "report" / "heldout_loss.png").stat().st_size > 10_000
    printed = result["summary"]
    assert printed.startswith("MergeDistill's question")
    for section in (
        f"{summary.MERGED}, against the best teacher of each language",
        "Exposure: windows per language",
        "Teachers, pre-trained",
        "[MASK] positions of that teacher's held-out windows",
        "Distilled minus MLM-only",
        "Raw held-out text",
        "Knowledge Inheritance's figure",
    ):
        assert section in printed
    record = json.loads((work / "teachers" / "multi" / "pretraining.json").read_text())
    assert set(record["held_out"]) == {"de", "en", "ru"} and record["steps"] == TINY.multi_steps
    config = yaml.safe_load((work / "configs" / "mlm_only.yaml").read_text())
    assert config["loss"]["alpha"] == {"schedule": "constant", "start": 0.0}


def test_rerunning_the_demo_skips_finished_steps(miniature):
    root, _ = miniature
    work = root / "work" / "quick"
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [
            work / "teachers" / "de_mono" / "config.json",
            work / "cache" / "manifest.json",
            work / "runs" / "mono_taught" / "metrics.jsonl",
        ]
    }
    demo.run(root / "work", root / "corpus", quick=True, settings=TINY)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_other_settings_in_the_same_workdir_are_refused(miniature):
    root, _ = miniature
    with pytest.raises(UserError, match="holds a demo with a different config"):
        demo.run(root / "work", root / "corpus", quick=True, settings=demo.QUICK)


def _heldout_metrics(folder, curve: dict[int, dict[str, tuple[float, int]]]):
    """A run folder whose metrics.jsonl holds, per step, held-out (mean cross-entropy, positions) per window."""
    folder.mkdir()
    lines = [
        {
            "step": step,
            "split": "heldout",
            "per_window": {
                key: {"positions": positions, "perplexity": math.exp(loss)}
                for key, (loss, positions) in windows.items()
            },
        }
        for step, windows in curve.items()
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_the_inheritance_step_compares_on_the_distilled_students_windows_only(tmp_path):
    # MLM-only ends at 4.0 on de/de_mono; on de/multi it ends far lower, so pooled over both windows it would end
    # at (4.0 * 100 + 1.0 * 300) / 400 = 1.75, a target the distilled student never reaches.
    baseline = _heldout_metrics(
        tmp_path / "mlm_only",
        {
            10: {"de/de_mono": (6.0, 100), "de/multi": (3.0, 300)},
            20: {"de/de_mono": (4.0, 100), "de/multi": (1.0, 300)},
        },
    )
    taught = _heldout_metrics(
        tmp_path / "mono_taught", {10: {"de/de_mono": (3.9, 100)}, 20: {"de/de_mono": (3.5, 100)}}
    )
    curves = summary.inheritance_curves([taught, baseline])
    assert curves["mono_taught"][1] == [(10, pytest.approx(6.0)), (20, pytest.approx(4.0))]
    assert summary.first_step_reaching(curves["mono_taught"][0], curves["mono_taught"][1][-1][1]) == 10
    pooled = summary.held_out_curve(summary.held_out_records(baseline))
    assert pooled[-1][1] == pytest.approx(1.75)  # positions-weighted, over every window when none are named
    assert summary.first_step_reaching(curves["mono_taught"][0], pooled[-1][1]) is None
