"""`mdkd demo`: the MergeDistill experiment in miniature, offline, on real multilingual text.

Recipe, each step skipped when its output is already there (so a rerun, or a rerun after Ctrl-C, picks up
where it stopped):
1. corpus: real running text from Debian's fortunes packages (or --corpus DIR), one document per line;
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

from mdkd.demo.fortunes import fetch_packages, write_corpus
from mdkd.demo.tiny_models import build_masked_lm, pretrain_masked_lm, train_tokenizer
from mdkd.pipeline.cache.documents import held_out
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


FULL = DemoSettings(documents=3000, mono_vocab=4000, multi_vocab=12000, mono_steps=400, multi_steps=800, student_steps=600)
QUICK = DemoSettings(documents=600, mono_vocab=2000, multi_vocab=6000, mono_steps=100, multi_steps=160, student_steps=120)


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


def run(workdir: Path, corpus_dir: Path | None, quick: bool, settings: DemoSettings | None = None,
        languages: list[str] | None = None, overwrite: bool = False) -> dict:
    from mdkd.stages import cache_logits

    settings = settings or (QUICK if quick else FULL)
    root = workdir / ("quick" if quick else "full")
    # One workdir holds one demo: other settings in the same folder would mix two experiments. A finished or
    # interrupted demo of these settings goes through its steps again, each skipped when its output exists.
    identity = asdict(settings)
    claim = claim_folder(root, RECORD, identity, what="demo", overwrite=overwrite, resume=True,
                         folder_option="--workdir")
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
    runs = [(_write_yaml(root / "configs" / f"{name}.yaml", _train_config(choice, settings)), root / "runs" / name)
            for name, choice in students(languages).items()]
    result = train_evaluate_report(runs, cache_dir=root / "cache", report_dir=root / "report")
    tqdm.write("[5/5] summary")
    summary = summarise([run_dir for _, run_dir in runs], languages)
    (root / "report" / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    write_json_atomic(root / RECORD, {"identity": identity, "complete": True})
    return {"root": str(root), "report": result, "summary": summary}


def _corpus(folder: Path, given: Path | None, languages: list[str], settings: DemoSettings) -> list[str]:
    """folder/<language>.txt for each language, from --corpus or from the fortunes packages."""
    marker = folder / "corpus.json"
    if marker.exists():
        return json.loads(marker.read_text())["languages"]
    if given is not None:
        files = sorted(given.glob("*.txt"))
        if not files:
            raise UserError(f"--corpus {given} holds no <language>.txt files (one document per line)")
        folder.mkdir(parents=True, exist_ok=True)
        counts = {}
        for path in files:
            lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()][: settings.documents]
            (folder / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[path.stem] = len(lines)
        source = str(given)
    else:
        roots = fetch_packages(languages, folder.parent / "packages")
        counts = write_corpus(roots, folder, settings.documents)
        source = "Debian fortunes packages: " + ", ".join(sorted(counts))
    write_json_atomic(marker, {"languages": sorted(counts), "documents": counts, "source": source})
    return sorted(counts)


def _training_texts(corpus: Path, language: str, fraction: float) -> list[str]:
    """A language's documents minus the held-out ones, read by stage one's corpus reader (so with the doc_ids the
    cache will hold) and split by the rule `mdkd train` uses: no teacher has seen the students' test documents."""
    source = CorpusSource.model_validate({"language": language, "path": str(corpus / f"{language}.txt")})
    return [d.text for d in read_language([source]) if not held_out(d.doc_id, fraction)]


def _teachers(root: Path, languages: list[str], settings: DemoSettings) -> None:
    sizes = dict(hidden=settings.hidden, layers=settings.layers, heads=settings.heads, max_positions=settings.max_length + 2)
    texts = {language: _training_texts(root / "corpus", language, settings.eval_fraction) for language in languages}
    plan = [(f"{l}_bert", "bert", "wordpiece", texts[l], settings.mono_vocab, settings.mono_steps) for l in languages]
    plan.append((MULTI, "xlm-roberta", "unigram", [t for l in languages for t in texts[l]], settings.multi_vocab, settings.multi_steps))
    for index, (name, model_type, family, corpus, vocab, steps) in enumerate(plan):
        final = root / "teachers" / name
        if (final / "config.json").exists():
            continue
        scratch = root / "teachers" / f".{name}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        tokenizer = train_tokenizer(family, corpus, vocab, scratch)
        model = build_masked_lm(model_type, tokenizer, seed=index, **sizes)
        with tqdm(total=steps, desc=f"  teacher {name}", unit="step") as progress:
            pretrain_masked_lm(model, tokenizer, corpus, steps, settings.batch_size, max_length=settings.max_length,
                               seed=index, progress=progress)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(final)  # a teacher exists only once it is whole


def _cache_config(root: Path, languages: list[str], settings: DemoSettings) -> dict:
    teachers = [{"name": f"{l}_bert", "model": str(root / "teachers" / f"{l}_bert"), "languages": [l]} for l in languages]
    teachers.append({"name": MULTI, "model": str(root / "teachers" / MULTI), "languages": languages})
    return {
        "corpus": [{"language": l, "path": str(root / "corpus" / f"{l}.txt")} for l in languages],
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
        "student": {"preset": None, "hidden_size": settings.hidden, "num_layers": settings.layers,
                    "num_heads": settings.heads, "intermediate_size": 4 * settings.hidden},
        "train": {"steps": settings.student_steps, "micro_batch_size": settings.batch_size, "lr": 1e-3,
                  "warmup": 0.1, "checkpoint_every": max(1, settings.student_steps // 3),
                  "eval_fraction": settings.eval_fraction, "seed": 0},
        "precision": "auto",
    }


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def summarise(runs: list[Path], languages: list[str]) -> str:
    """Per-language held-out accuracy of every student and teacher, and plain statements of what came out."""
    evals = {run.name: json.loads((run / "eval.json").read_text()) for run in runs}
    rows = ["language  " + "  ".join(f"{name:>12}" for name in evals) + f"  {'own teacher':>12}  {MULTI:>12}"]
    best_counts: dict[str, int] = {}
    for language in languages:
        accuracy = {name: e["languages"].get(language, {}).get("model", {}).get("accuracy") for name, e in evals.items()}
        windows = next(iter(evals.values()))["languages"].get(language, {}).get("windows", {})
        own = windows.get(f"{language}_bert", {}).get("teacher", {}).get("accuracy")
        multi = windows.get(MULTI, {}).get("teacher", {}).get("accuracy")
        cells = [f"{v:12.3f}" if v is not None else f"{'-':>12}" for v in [*accuracy.values(), own, multi]]
        rows.append(f"{language:<8}  " + "  ".join(cells))
        scored = {k: v for k, v in accuracy.items() if v is not None}
        if scored:
            best = max(scored, key=scored.get)
            best_counts[best] = best_counts.get(best, 0) + 1
    mean = {name: _mean([e["languages"].get(l, {}).get("model", {}).get("accuracy") for l in languages]) for name, e in evals.items()}
    lines = ["Held-out masked-token accuracy (students on every teacher's windows of the language; teachers from the cache):",
             *rows, "", "Mean over languages: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None)]
    lines.append("Best student per language: " + ", ".join(f"{k} ({v} of {len(languages)})" for k, v in sorted(best_counts.items())))
    if mean.get("mono_taught") is not None and mean.get("multi_taught") is not None:
        gap = mean["mono_taught"] - mean["multi_taught"]
        verdict = "better" if gap > 0 else "worse" if gap < 0 else "no different"
        lines.append(f"Taught by the monolingual teachers, the student did {verdict} than when taught by the multilingual "
                     f"one ({gap:+.3f} mean accuracy).")
    if mean.get("mlm_only") is not None:
        kd_best = max((v for k, v in mean.items() if k != "mlm_only" and v is not None), default=None)
        if kd_best is not None:
            lines.append(f"Best distilled student vs the MLM-only baseline: {kd_best - mean['mlm_only']:+.3f} mean accuracy.")
    return "\n".join(lines)


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
