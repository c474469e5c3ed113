"""`mdkd demo`: the MergeDistill experiment in miniature, offline, on real multilingual text.

Recipe, each step skipped when its output is already there (so a rerun, or a rerun after Ctrl-C, picks up
where it stopped):
1. corpus: real running text from Debian's packages (LibreOffice help, translated manual pages, fortunes; see
   mdkd/demo/corpus.py), language-filtered, one paragraph per line (or --corpus DIR);
2. teachers: one monolingual BERT per language with its own WordPiece vocabulary, and one multilingual
   XLM-R-style teacher with one shared SentencePiece (Unigram) vocabulary, each pre-trained briefly here on its
   own data (held-out documents excluded) and saved as an ordinary HF folder;
3. stage one once, for every teacher;
4. from that one cache, four students of one size and step budget: taught by the monolingual teachers, by the
   multilingual teacher, by both (each sequence served by one of them), and an MLM-only baseline (alpha = 0);
5. `mdkd eval` for each student, `mdkd report` over all of them, and a printed summary of what came out.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from mdkd.demo.corpus import fetch_packages, write_corpus
from mdkd.demo.tiny_models import build_masked_lm, pretrain_masked_lm, train_tokenizer
from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.run_folder import claim_folder, prepare_folder
from mdkd.pipeline.teacher_pass.config import CorpusSource
from mdkd.pipeline.teacher_pass.corpus import read_language
from mdkd.stages.sweep import train_evaluate_report

LANGUAGES = ["de", "en", "ru", "zh"]
MULTI = "multi_xlmr"


@dataclass(frozen=True)
class DemoSettings:
    documents: int  # per language
    mono_vocab: int
    multi_vocab: int
    mono_steps: int
    multi_steps: int
    student_steps: int
    batch_size: int = 32
    max_length: int = 64
    eval_fraction: float = 0.05
    hidden: int = 128
    layers: int = 2
    heads: int = 2


FULL = DemoSettings(
    documents=3000, mono_vocab=4000, multi_vocab=12000, mono_steps=400, multi_steps=800, student_steps=600
)
QUICK = DemoSettings(
    documents=600, mono_vocab=2000, multi_vocab=6000, mono_steps=100, multi_steps=160, student_steps=120
)


def students(languages: list[str]) -> dict[str, dict]:
    """The four students: the teacher choice per language and the loss, everything else equal."""
    mono = {language: f"{language}_bert" for language in languages}
    both = {language: [f"{language}_bert", MULTI] for language in languages}
    kd = {"temperature": 2.0, "top_k": 8, "alpha": {"schedule": "linear", "start": 1.0}}
    return {
        "mono_taught": {"teachers": mono, "loss": kd},
        "multi_taught": {"teachers": {language: MULTI for language in languages}, "loss": kd},
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

    tqdm.write("[1/5] corpus")
    languages = _corpus(root / "corpus", corpus_dir, languages or LANGUAGES, settings)
    tqdm.write("[2/5] teachers: pre-training one per language and one multilingual")
    _teachers(root, languages, settings)
    tqdm.write("[3/5] stage one: caching every teacher's predictions once")
    cache_config = _write_yaml(root / "configs" / "cache.yaml", _cache_config(root, languages, settings))
    cache_logits.run(cache_config, root / "cache")
    tqdm.write("[4/5] stage two: four students from the one cache, each evaluated; then the report")
    runs = [
        (_write_yaml(root / "configs" / f"{name}.yaml", _train_config(choice, settings)), root / "runs" / name)
        for name, choice in students(languages).items()
    ]
    result = train_evaluate_report(runs, cache_dir=root / "cache", report_dir=root / "report")
    tqdm.write("[5/5] summary")
    summary = summarise([run_dir for _, run_dir in runs], languages)
    (root / "report" / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    write_json_atomic(root / RECORD, {"identity": identity, "complete": True})
    return {"root": str(root), "report": result, "summary": summary}


def _corpus(folder: Path, given: Path | None, languages: list[str], settings: DemoSettings) -> list[str]:
    """folder/<language>.txt for each language, from --corpus or from Debian's packages (mdkd.demo.corpus)."""
    marker = folder / "corpus.json"
    if marker.exists():
        return json.loads(marker.read_text())["languages"]
    if given is not None:
        files = sorted(given.glob("*.txt"))
        if not files:
            raise UserError(f"--corpus {given} holds no <language>.txt files (one document per line)")
        folder.mkdir(parents=True, exist_ok=True)
        counts, record = {}, {}
        for path in files:
            text = path.read_text(encoding="utf-8")
            lines = [line for line in text.splitlines() if line.strip()][: settings.documents]
            (folder / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[path.stem] = len(lines)
        source = str(given)
    else:
        roots = fetch_packages(languages, folder.parent / "packages")
        record = write_corpus(roots, folder, documents_per_language=settings.documents)
        counts = {language: stats["documents"] for language, stats in record.items()}
        source = "Debian packages: " + ", ".join(deb for stats in record.values() for deb in stats["packages"])
    write_json_atomic(marker, {"languages": sorted(counts), "documents": counts, "source": source, "stats": record})
    return sorted(counts)


def _training_texts(corpus: Path, language: str, fraction: float) -> list[str]:
    """A language's documents minus the held-out ones, read by stage one's corpus reader (so with the doc_ids the
    cache will hold) and split by the rule `mdkd train` uses: no teacher has seen the students' test documents."""
    source = CorpusSource.model_validate({"language": language, "path": str(corpus / f"{language}.txt")})
    return [d.text for d in read_language([source]) if not held_out(d.doc_id, fraction)]


def _teachers(root: Path, languages: list[str], settings: DemoSettings) -> None:
    sizes = dict(
        hidden=settings.hidden, layers=settings.layers, heads=settings.heads, max_positions=settings.max_length + 2
    )
    texts = {language: _training_texts(root / "corpus", language, settings.eval_fraction) for language in languages}
    plan = [
        (f"{language}_bert", "bert", "wordpiece", texts[language], settings.mono_vocab, settings.mono_steps)
        for language in languages
    ]
    plan.append(
        (
            MULTI,
            "xlm-roberta",
            "unigram",
            [t for language in languages for t in texts[language]],
            settings.multi_vocab,
            settings.multi_steps,
        )
    )
    for index, (name, model_type, family, corpus, vocab, steps) in enumerate(plan):
        final = root / "teachers" / name
        if (final / "config.json").exists():
            continue
        scratch = root / "teachers" / f".{name}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        tokenizer = train_tokenizer(family, corpus, vocab, scratch)
        model = build_masked_lm(model_type, tokenizer, seed=index, **sizes)
        with tqdm(total=steps, desc=f"  teacher {name}", unit="step") as progress:
            pretrain_masked_lm(
                model,
                tokenizer,
                corpus,
                steps,
                settings.batch_size,
                max_length=settings.max_length,
                seed=index,
                progress=progress,
            )
        with transformers_console(Ranks.from_env()):  # no weight-writing bar off a terminal
            model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(final)  # a teacher exists only once it is whole


def _cache_config(root: Path, languages: list[str], settings: DemoSettings) -> dict:
    teachers = [
        {"name": f"{language}_bert", "model": str(root / "teachers" / f"{language}_bert"), "languages": [language]}
        for language in languages
    ]
    teachers.append({"name": MULTI, "model": str(root / "teachers" / MULTI), "languages": languages})
    return {
        "corpus": [{"language": language, "path": str(root / "corpus" / f"{language}.txt")} for language in languages],
        "teachers": teachers,
        "masking": {"probability": 0.15, "mask": 0.8, "random": 0.1, "keep": 0.1, "seed": 0, "copies": 1},
        "max_length": settings.max_length,
        "top_k": 8,
        "shard_documents": 512,
    }


def _train_config(choice: dict, settings: DemoSettings) -> dict:
    return {
        **choice,
        "language_sampling": 0.7,
        "student": {
            "preset": None,
            "hidden_size": settings.hidden,
            "num_layers": settings.layers,
            "num_heads": settings.heads,
            "intermediate_size": 4 * settings.hidden,
        },
        "train": {
            "steps": settings.student_steps,
            "micro_batch_size": settings.batch_size,
            "lr": 1e-3,
            "warmup": 0.1,
            "checkpoint_every": max(1, settings.student_steps // 3),
            "eval_fraction": settings.eval_fraction,
            "seed": 0,
        },
        "precision": "auto",
    }


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def summarise(runs: list[Path], languages: list[str]) -> str:
    """Each student against each of its teachers on that teacher's held-out windows (the same positions for both,
    so like for like), the ratio of their accuracies, raw-text accuracy, and plain statements of what came out.

    Students taught by different teachers are scored on different windows, so the statements that compare
    students use the ratio student / teacher accuracy (position-weighted over each student's teachers' windows of
    a language): how much of its own teachers' accuracy each student kept."""

    def cell(value, width: int, digits: int = 3) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    evals, outdated = {}, []
    for run in runs:
        report = json.loads((run / "eval.json").read_text())
        if "scope" in report:
            evals[run.name] = report
        else:
            outdated.append(run.name)
    title = (
        "Held-out masked-token accuracy: each student against each of its teachers on that teacher's held-out "
        "windows (the same positions for both; ratio = student / teacher):"
    )
    header = (
        f"{'language':<8}  {'teacher':<12}  {'student':<12}  {'positions':>9}  {'student':>7}  {'teacher':>7}  "
        f"{'ratio':>5}  {'keep acc s/t':>12}"
    )
    lines = [title, header]
    ratio: dict[str, dict[str, float]] = {}  # student -> language -> ratio over its teachers' windows
    for language in languages:
        for teacher in sorted({t for e in evals.values() for t in e["languages"].get(language, {}).get("windows", {})}):
            for name, report in evals.items():
                scored = report["languages"].get(language, {}).get("windows", {}).get(teacher)
                if not scored or "accuracy" not in scored["model"]:
                    continue
                keep = scored["by_kind"]["keep"]
                keep_cell = (
                    f"{keep['model']['accuracy']:.3f}/{keep['teacher']['accuracy']:.3f}" if keep["positions"] else "-"
                )
                lines.append(
                    f"{language:<8}  {teacher:<12}  {name:<12}  {scored['positions']:>9}  "
                    f"{scored['model']['accuracy']:7.3f}  {scored['teacher']['accuracy']:7.3f}  "
                    f"{cell(scored.get('accuracy_ratio'), 5, 2)}  {keep_cell:>12}"
                )
        for name, report in evals.items():
            summary = report["languages"].get(language, {}).get("summary", {})
            if summary.get("accuracy_ratio") is not None:
                ratio.setdefault(name, {})[language] = summary["accuracy_ratio"]
    lines += [
        "",
        "Raw held-out text, each student with its own tokenizer and fresh masking (accuracy):",
        "language  " + "  ".join(f"{name:>12}" for name in evals),
    ]
    for language in languages:
        raw = [e["languages"].get(language, {}).get("raw_text", {}).get("accuracy") for e in evals.values()]
        lines.append(f"{language:<8}  " + "  ".join(cell(v, 12) for v in raw))
    best_counts: dict[str, int] = {}
    for language in languages:
        scored = {name: by_language[language] for name, by_language in ratio.items() if language in by_language}
        if scored:
            best = max(scored, key=scored.get)
            best_counts[best] = best_counts.get(best, 0) + 1
    mean = {name: _mean([ratio.get(name, {}).get(language) for language in languages]) for name in evals}
    lines += [
        "",
        "Mean over languages of student / teacher accuracy (each student against its own teachers, on the "
        "same positions): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None),
    ]
    lines.append(
        "Best student per language (by that ratio): "
        + ", ".join(f"{k} ({v} of {len(languages)})" for k, v in sorted(best_counts.items()))
    )
    if mean.get("mono_taught") is not None and mean.get("multi_taught") is not None:
        gap = mean["mono_taught"] - mean["multi_taught"]
        verdict = "better" if gap > 0 else "worse" if gap < 0 else "no different"
        lines.append(
            f"Taught by the monolingual teachers, the student did {verdict} than when taught by the "
            f"multilingual one, each against its own teachers ({gap:+.3f} mean student/teacher accuracy "
            "ratio)."
        )
    lines += _against_mlm_only(evals, languages)
    if outdated:
        lines.append(
            "Not summarised (eval.json from an older mdkd; delete it and rerun the demo): " + ", ".join(outdated)
        )
    return "\n".join(lines)


def _against_mlm_only(evals: dict[str, dict], languages: list[str]) -> list[str]:
    """Each distilled student against the MLM-only student on the same windows (MLM-only trains with every teacher,
    so it is scored on every teacher's windows): accuracy difference, and on how many windows it is ahead."""
    if "mlm_only" not in evals:
        return []

    def accuracy(report: dict, language: str, teacher: str) -> float | None:
        return (
            report["languages"].get(language, {}).get("windows", {}).get(teacher, {}).get("model", {}).get("accuracy")
        )

    lines = []
    for name, report in evals.items():
        if name == "mlm_only":
            continue
        pairs = [
            (mine, baseline)
            for language in languages
            for teacher in report["languages"].get(language, {}).get("windows", {})
            if (mine := accuracy(report, language, teacher)) is not None
            and (baseline := accuracy(evals["mlm_only"], language, teacher)) is not None
        ]
        if pairs:
            gain = sum(mine - baseline for mine, baseline in pairs) / len(pairs)
            ahead = sum(mine > baseline for mine, baseline in pairs)
            lines.append(
                f"{name} vs the MLM-only student on the same windows: {gain:+.3f} mean accuracy, ahead on {ahead} of "
                f"{len(pairs)} (language, teacher) windows."
            )
    return lines


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
