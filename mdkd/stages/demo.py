"""`mdkd demo`: the MergeDistill experiment in miniature, offline, on real multilingual text.

MergeDistill's premise, at a size two CPU cores run in minutes: teachers that have seen far more of their
language than the student will, each with a vocabulary built for it; one student size and one step budget for
every student; the student distils on a smaller slice of the text.

Recipe, each step skipped when its output is already there (so a rerun, or a rerun after Ctrl-C, picks up
where it stopped):
1. corpus: real running text from Debian's packages (LibreOffice help, translated manual pages, fortunes; see
   mdkd/demo/corpus.py), language-filtered, one paragraph per line (or --corpus DIR): the teachers' text, and its
   first documents as the students' slice;
2. teachers: one monolingual teacher per language with its own WordPiece vocabulary, and one multilingual teacher
   with one shared SentencePiece-style (Unigram) vocabulary, each pre-trained here on every window of its
   languages' text (held-out documents excluded), scored against the frequent-token bar, and saved as an ordinary
   HF folder;
3. stage one once, for every teacher, on the students' slice;
4. from that one cache, four students of one size and step budget: taught by the monolingual teachers, by the
   multilingual teacher, by both (each sequence served by one of them), and an MLM-only baseline (alpha = 0);
5. `mdkd eval` for each student, `mdkd report` over all of them, the held-out loss curves, and a printed summary
   (mdkd/demo/summary.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from mdkd.demo.corpus import fetch_packages, write_corpus
from mdkd.demo.summary import plot_inheritance, summarise
from mdkd.demo.tiny_models import build_masked_lm, masked_lm_accuracy, pretrain_masked_lm, train_tokenizer
from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.run_folder import claim_folder, prepare_folder
from mdkd.pipeline.teacher_pass.config import CorpusSource
from mdkd.pipeline.teacher_pass.corpus import read_language
from mdkd.stages.sweep import train_evaluate_report

LANGUAGES = ["de", "en", "ru", "zh"]
MULTI = "multi"
# A teacher this small spreads its mass thinly: its top-8 holds 24 to 46 % of it at tau = 1 and 3 to 8 % at tau = 2
# (`mdkd cache inspect`), so the students distil from the top-64 at tau = 1, which holds 42 to 72 % (docs/demo.md).
TOP_K = 64
TEACHER_ARCHITECTURE = "modernbert"  # pre-norm: leaves the frequent-token plateau fast (see pretrain_masked_lm)
PRETRAINING = "pretraining.json"  # beside each teacher: its steps, time, and held-out accuracy against the bar
HELD_OUT_DOCUMENTS = 400  # per language for a teacher's own accuracy: thousands of [MASK] positions


def mono(language: str) -> str:
    return f"{language}_mono"


@dataclass(frozen=True)
class DemoSettings:
    documents: int  # per language: the students' slice, which stage one caches (the first documents of the text)
    teacher_bytes: int  # per language: the teachers' text, of which the students' slice is the start
    mono_vocab: int
    multi_vocab: int
    mono_steps: int
    multi_steps: int
    student_steps: int
    eval_every: int  # held-out loss of every student this often: the curves of Knowledge Inheritance's figure
    batch_size: int = 32
    max_length: int = 64
    eval_fraction: float = 0.05
    hidden: int = 128
    layers: int = 2
    heads: int = 2


FULL = DemoSettings(
    documents=2000,
    teacher_bytes=3_000_000,
    mono_vocab=4000,
    multi_vocab=12000,
    mono_steps=800,
    multi_steps=1600,
    student_steps=400,
    eval_every=20,
)
QUICK = DemoSettings(
    documents=400,
    teacher_bytes=400_000,
    mono_vocab=2000,
    multi_vocab=5000,
    mono_steps=120,
    multi_steps=200,
    student_steps=80,
    eval_every=20,
)


def students(languages: list[str]) -> dict[str, dict]:
    """The four students: the teacher choice per language and the loss, everything else equal."""
    kd = {"temperature": 1.0, "top_k": TOP_K, "alpha": {"schedule": "linear", "start": 1.0}}
    both = {language: [mono(language), MULTI] for language in languages}
    return {
        "mono_taught": {"teachers": {language: mono(language) for language in languages}, "loss": kd},
        "multi_taught": {"teachers": dict.fromkeys(languages, MULTI), "loss": kd},
        "both_taught": {"teachers": both, "loss": kd},
        "mlm_only": {"teachers": both, "loss": {**kd, "alpha": {"schedule": "constant", "start": 0.0}}},
    }


RECORD = "demo.json"


def run(
    workdir: Path,
    corpus_dir: Path | None,
    quick: bool,
    settings: DemoSettings | None = None,
    languages: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    from mdkd.stages import cache_logits

    settings = settings or (QUICK if quick else FULL)
    root = workdir / ("quick" if quick else "full")
    # One workdir holds one demo: other settings in the same folder would mix two experiments. A finished or
    # interrupted demo of these settings goes through its steps again, each skipped when its output exists.
    identity = asdict(settings)
    claim = claim_folder(
        root, RECORD, identity, what="demo", overwrite=overwrite, resume=True, folder_option="--workdir"
    )
    prepare_folder(claim)
    if claim.action == "new" or claim.action == "replace":
        write_json_atomic(root / RECORD, {"identity": identity, "complete": False})

    tqdm.write("[1/5] corpus: the teachers' text per language, and the students' smaller slice of it")
    languages = _corpus(root, corpus_dir, languages or LANGUAGES, settings)
    tqdm.write("[2/5] teachers: pre-training one per language and one multilingual, on all of their text")
    teachers = _teachers(root, languages, settings)
    tqdm.write("[3/5] stage one: caching every teacher's predictions on the students' slice, once")
    cache_config = _write_yaml(root / "configs" / "cache.yaml", _cache_config(root, languages, settings))
    cache_logits.run(cache_config, root / "cache")
    tqdm.write("[4/5] stage two: four students of one size and step budget from the one cache; then the report")
    runs = [
        (_write_yaml(root / "configs" / f"{name}.yaml", _train_config(choice, settings)), root / "runs" / name)
        for name, choice in students(languages).items()
    ]
    result = train_evaluate_report(runs, cache_dir=root / "cache", report_dir=root / "report")
    tqdm.write("[5/5] summary")
    run_dirs = [run_dir for _, run_dir in runs]
    if plot_inheritance(run_dirs, root / "report" / "heldout_loss.png"):
        result["plots"].append("heldout_loss.png")
    text = summarise(run_dirs, languages, teachers)
    (root / "report" / "summary.txt").write_text(text + "\n", encoding="utf-8")
    write_json_atomic(root / RECORD, {"identity": identity, "complete": True})
    return {"root": str(root), "report": result, "summary": text}


def _corpus(root: Path, given: Path | None, languages: list[str], settings: DemoSettings) -> list[str]:
    """teacher_corpus/<language>.txt (from --corpus or from Debian's packages, mdkd.demo.corpus) and
    corpus/<language>.txt, its first `documents` lines: the same file name and line numbers, so a document has
    one doc_id in both and the held-out rule leaves out the same documents for teachers and students."""
    marker = root / "corpus" / "corpus.json"
    if marker.exists():
        return json.loads(marker.read_text())["languages"]
    teacher_folder = root / "teacher_corpus"
    if given is not None:
        files = sorted(given.glob("*.txt"))
        if not files:
            raise UserError(f"--corpus {given} holds no <language>.txt files (one document per line)")
        teacher_folder.mkdir(parents=True, exist_ok=True)
        record = {}
        for path in files:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            body = "\n".join(lines) + "\n"
            (teacher_folder / path.name).write_text(body, encoding="utf-8")
            record[path.stem] = {"documents": len(lines), "bytes": len(body.encode())}
        source = str(given)
    else:
        roots = fetch_packages(languages, root / "packages")
        record = write_corpus(roots, teacher_folder, bytes_per_language=settings.teacher_bytes)
        source = "Debian packages: " + ", ".join(deb for stats in record.values() for deb in stats["packages"])
    students_folder = root / "corpus"
    students_folder.mkdir(parents=True, exist_ok=True)
    for language in record:
        lines = (teacher_folder / f"{language}.txt").read_text(encoding="utf-8").splitlines()[: settings.documents]
        (students_folder / f"{language}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        record[language]["students_documents"] = len(lines)
    write_json_atomic(marker, {"languages": sorted(record), "source": source, "stats": record})
    return sorted(record)


def _split_documents(folder: Path, language: str, fraction: float) -> tuple[list[str], list[str]]:
    """A language's (training, held-out) documents, read by stage one's corpus reader, so with the doc_ids the
    cache will hold, and split by the rule `mdkd train` uses: no teacher sees the students' test documents."""
    source = CorpusSource.model_validate({"language": language, "path": str(folder / f"{language}.txt")})
    training, held = [], []
    for document in read_language([source]):
        (held if held_out(document.doc_id, fraction) else training).append(document.text)
    return training, held


def _teachers(root: Path, languages: list[str], settings: DemoSettings) -> dict[str, dict]:
    """Build each teacher once (a rerun keeps the ones that are whole); returns each one's pre-training record."""
    splits = {
        language: _split_documents(root / "teacher_corpus", language, settings.eval_fraction) for language in languages
    }
    plan = [
        (mono(language), [language], "wordpiece", settings.mono_vocab, settings.mono_steps) for language in languages
    ]
    plan.append((MULTI, languages, "unigram", settings.multi_vocab, settings.multi_steps))
    records = {}
    for index, (name, served, family, vocab, steps) in enumerate(plan):
        final = root / "teachers" / name
        if not (final / "config.json").exists():
            _build_teacher(
                root, name, {language: splits[language] for language in served}, family, vocab, steps, index, settings
            )
        records[name] = json.loads((final / PRETRAINING).read_text())
    return records


def _build_teacher(root, name, splits: dict, family, vocab, steps, seed, settings: DemoSettings) -> None:
    """Tokenizer, ModernBERT masked LM, pre-training on every window of the served languages' training text
    (`splits`: language -> (training, held-out) documents), held-out accuracy against the frequent-token bar;
    written to a scratch folder, renamed once whole."""
    scratch = root / "teachers" / f".{name}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    corpus = [text for training, _ in splits.values() for text in training]
    tokenizer = train_tokenizer(family, corpus, vocab, scratch)
    sizes = dict(hidden=settings.hidden, layers=settings.layers, heads=settings.heads)
    model = build_masked_lm(TEACHER_ARCHITECTURE, tokenizer, seed=seed, max_positions=settings.max_length, **sizes)
    started = time.perf_counter()
    with tqdm(total=steps, desc=f"  teacher {name}", unit="step") as progress:
        losses = pretrain_masked_lm(
            model,
            tokenizer,
            corpus,
            steps,
            settings.batch_size,
            max_length=settings.max_length,
            seed=seed,
            progress=progress,
        )
    seconds = time.perf_counter() - started
    held = {
        language: masked_lm_accuracy(model, tokenizer, held_out_texts[:HELD_OUT_DOCUMENTS], settings.max_length)
        for language, (_, held_out_texts) in splits.items()
    }
    with transformers_console(Ranks.from_env()):  # no weight-writing bar off a terminal
        model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    record = {
        "architecture": TEACHER_ARCHITECTURE,
        "tokenizer": family,
        "vocabulary": len(tokenizer),
        "steps": steps,
        "seconds": round(seconds, 1),
        "text_bytes": {
            language: sum(len(t.encode()) + 1 for t in training) for language, (training, _) in splits.items()
        },
        "loss_first_last": [losses[0], sum(losses[-20:]) / len(losses[-20:])],
        "held_out": held,
    }
    write_json_atomic(scratch / PRETRAINING, record)
    scratch.rename(root / "teachers" / name)  # a teacher exists only once it is whole


def _cache_config(root: Path, languages: list[str], settings: DemoSettings) -> dict:
    teachers = [
        {"name": mono(language), "model": str(root / "teachers" / mono(language)), "languages": [language]}
        for language in languages
    ]
    teachers.append({"name": MULTI, "model": str(root / "teachers" / MULTI), "languages": languages})
    return {
        "corpus": [{"language": language, "path": str(root / "corpus" / f"{language}.txt")} for language in languages],
        "teachers": teachers,
        "masking": {"probability": 0.15, "mask": 0.8, "random": 0.1, "keep": 0.1, "seed": 0, "copies": 1},
        "max_length": settings.max_length,
        "top_k": TOP_K,
        "shard_documents": 512,
    }


def _train_config(choice: dict, settings: DemoSettings) -> dict:
    return {
        **choice,
        "language_sampling": 0.7,
        "student": {
            "architecture": "modernbert",  # as the teachers: a post-norm BERT this small barely learns in the budget
            "preset": None,
            "hidden_size": settings.hidden,
            "num_layers": settings.layers,
            "num_heads": settings.heads,
            "intermediate_size": 4 * settings.hidden,
            "dropout": 0.0,
        },
        "train": {
            "steps": settings.student_steps,
            "micro_batch_size": settings.batch_size,
            "lr": 2e-3,
            "warmup": 0.1,
            "checkpoint_every": max(1, settings.student_steps // 3),
            "eval_fraction": settings.eval_fraction,
            "eval_every": settings.eval_every,
            "eval_rows": 96,
            "seed": 0,
        },
        "precision": "auto",
    }


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
