"""`mdkd demo`: the MergeDistill experiment in miniature, offline, on real multilingual text.

MergeDistill's premise, at a size two CPU cores run in minutes: teachers that have seen far more of their
language than the student will, each with a vocabulary built for it; one student size and one step budget for
every student; the student distils on a smaller slice of the text.

Recipe, each step skipped when its output is already there (so a rerun, or a rerun after Ctrl-C, picks up
where it stopped):
1. corpus: real running text from Debian's packages (LibreOffice help, translated manual pages, fortunes; see
   mdkd/demo/corpus/), language-filtered, one paragraph per line (or --corpus DIR): the teachers' text, and its
   first documents as the students' slice;
2. teachers: one monolingual teacher per language with its own WordPiece vocabulary, and one multilingual teacher
   with one shared SentencePiece-style (Unigram) vocabulary, each pre-trained here on every window of its
   languages' text (held-out documents excluded), scored against the frequent-token bar, and saved as an ordinary
   HF folder (mdkd/demo/teachers.py);
3. stage one once, for every teacher, on the students' slice;
4. from that one cache, six students of one size and step budget: from random weights, taught by the monolingual
   teachers, by the multilingual teacher, by both (each sequence served by one of them), and an MLM-only baseline
   (alpha = 0); and two that inherit the multilingual teacher's weights (MergeDistill's setting), one taught by
   the monolingual teachers, one with MLM only on the same windows;
5. `mdkd eval` for each student (on its own teachers' windows, and again on every teacher's, for the lead table
   that holds every student against every teacher on the same positions), `mdkd report` over all of them, the
   held-out loss curves, and a printed summary (mdkd/demo/summary.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from mdkd.demo.configs import cache_config, train_config, write_yaml
from mdkd.demo.corpus.assemble import prepare_corpus
from mdkd.demo.settings import FULL, LANGUAGES, MULTI, QUICK, TOP_K, DemoSettings, mono
from mdkd.demo.summary import BASELINE, INHERITED_BASELINE, MERGED, plot_inheritance, summarise
from mdkd.demo.teachers import build_teachers
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distributed import Ranks
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.output_folder import FolderClaim, take_over
from mdkd.stages.sweep import run_many

RECORD = "demo.json"
EVERY_TEACHER = "every_teacher"  # report/<this>/<student>.json: each student on every teacher's windows


def students(languages: list[str]) -> dict[str, dict]:
    """The six students: the teacher choice per language, the loss and the start, everything else equal.

    Four start from random weights (teacher selection, and Knowledge Inheritance's figure against MLM-only); two
    ask MergeDistill's question: starting from the multilingual teacher's weights, does distilling each language
    from its own teacher beat MLM on the same data and steps?"""
    kd = {"temperature": 1.0, "top_k": TOP_K, "alpha": {"schedule": "linear", "start": 1.0}}
    mlm = {**kd, "alpha": {"schedule": "constant", "start": 0.0}}
    own = {language: mono(language) for language in languages}
    both = {language: [mono(language), MULTI] for language in languages}
    return {
        "mono_taught": {"teachers": own, "loss": kd},
        "multi_taught": {"teachers": dict.fromkeys(languages, MULTI), "loss": kd},
        "both_taught": {"teachers": both, "loss": kd},
        BASELINE: {"teachers": both, "loss": mlm},
        MERGED: {"teachers": own, "loss": kd, "init": MULTI},
        INHERITED_BASELINE: {"teachers": own, "loss": mlm, "init": MULTI},
    }


def run(
    workdir: Path,
    corpus_dir: Path | None,
    quick: bool,
    settings: DemoSettings | None = None,
    languages: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    from mdkd.stages import cache_logits, evaluate

    settings = settings or (QUICK if quick else FULL)
    root = workdir / ("quick" if quick else "full")
    # One workdir holds one demo: other settings in the same folder would mix two experiments. A finished or
    # interrupted demo of these settings goes through its steps again, each skipped when its output exists.
    identity = asdict(settings)

    def start(claim: FolderClaim) -> None:
        if claim.action in ("new", "replace"):  # a resumed demo's record says "not complete" already
            write_json_atomic(root / RECORD, {"identity": identity, "complete": False})

    take_over(
        root,
        RECORD,
        identity,
        Ranks.from_env(),
        what="demo",
        is_record=lambda record: (
            isinstance(record.get("identity"), dict)
            and record["identity"].keys() == identity.keys()
            and isinstance(record.get("complete"), bool)
        ),
        overwrite=overwrite,
        resume=True,
        folder_option="--workdir",
        start=start,
    )

    # The students' slice is the start of the teachers' text, line for line: a document keeps its doc_id in both,
    # so the held-out rule leaves out the same documents for the teachers and for the students.
    tqdm.write("[1/5] corpus: the teachers' text per language, and the students' smaller slice of it")
    languages = prepare_corpus(
        root,
        corpus_dir,
        languages or LANGUAGES,
        teacher_bytes=settings.teacher_bytes,
        student_documents=settings.documents,
    )
    tqdm.write("[2/5] teachers: pre-training one per language and one multilingual, on all of their text")
    teachers = build_teachers(root, languages, settings)
    # One cache for every student: they differ only in which cached teachers they read and in the loss.
    tqdm.write("[3/5] stage one: caching every teacher's predictions on the students' slice, once")
    cache_yaml = write_yaml(root / "configs" / "cache.yaml", cache_config(root, languages, settings))
    cache_logits.run(cache_yaml, root / "cache")
    tqdm.write("[4/5] stage two: six students of one size and step budget from the one cache; then the report")
    runs = [
        (write_yaml(root / "configs" / f"{name}.yaml", train_config(choice, settings)), root / "runs" / name)
        for name, choice in students(languages).items()
    ]
    result = run_many(runs, cache_dir=root / "cache", report_dir=root / "report")
    tqdm.write("[5/5] summary: every student on every teacher's windows, then the tables")
    run_dirs = [run_dir for _, run_dir in runs]
    every_teacher = {}
    for run_dir in run_dirs:
        scored = root / "report" / EVERY_TEACHER / f"{run_dir.name}.json"
        student = RunFolder(run_dir).student_dir
        # Kept from an earlier pass only when written after the student it scores.
        if scored.exists() and scored.stat().st_mtime >= student.stat().st_mtime:
            every_teacher[run_dir.name] = json.loads(scored.read_text(encoding="utf-8"))
        else:
            every_teacher[run_dir.name] = evaluate.run(
                run_dir, cache_dir=root / "cache", out_file=scored, all_teachers=True
            )
    if plot_inheritance(run_dirs, root / "report" / "heldout_loss.png"):
        result["plots"].append("heldout_loss.png")
    text = summarise(run_dirs, languages, teachers, every_teacher)
    (root / "report" / "summary.txt").write_text(text + "\n", encoding="utf-8")
    write_json_atomic(root / RECORD, {"identity": identity, "complete": True})
    return {"root": str(root), "report": result, "summary": text}
