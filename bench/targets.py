"""Measurement, not a test: with a WEAK teacher (its top-8 holding roughly 15-25 % of its probability at tau = 1),
does pure KD give a usable student, for each loss variant?

It uses mdkd's public pieces only (the stages' `run` functions, `RunFolder`, the cache reader), like bench/train.py.
From real text (`--corpus DIR` holding de.txt and ru.txt, one document per line; default: the quick demo's teacher
corpus) it

1. pre-trains two weak teachers with mdkd.tiny_models, a German WordPiece BERT and a Russian Unigram XLM-R
   (hidden 128, 2 layers), each on its language's training documents only: the documents `mdkd train` holds out
   (its rule on the doc_ids stage one gives them, eval fraction 0.1) are the students' test set, as in the demo;
   the larger vocabulary is shrunk until both teachers have as many distinct tokens (a cache has one top_k);
2. runs stage one three times on the students' slice (the first --documents lines of each language), with one
   masking seed, so at the same positions: top-8 with a sampled tail (--tail-samples draws at --tail-temperature),
   the same without the tail (for its bytes alone), and "dense", every distinct token of each teacher;
3. trains a tiny BERT student per loss variant (`VARIANTS`), pure KD (alpha 1 throughout), tau 2, k' 8, each
   language taught by its teacher, and one untrained student (1 step at lr 1e-12: the initial weights every
   student starts from) as the agreement baseline;
4. scores every student with `mdkd eval` on the dense cache's windows of its run's held-out documents, where the
   teacher's cross-entropy of the true token is exact, not a lower bound.

A student counts as usable (`USABLE`) when its probability on tokens the teacher cannot emit is at most 0.02, its
cross-entropy of the true token is within 1 nat of the teacher's, and its agreement with the teacher's top-1 is at
least 5 times the untrained student's.

    python bench/targets.py --tiny --corpus DIR      # smoke run (its figures mean little)
    python bench/targets.py --corpus DIR             # the measurement: about 5 minutes on 2 idle CPU cores

Everything but the figures goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import yaml

# bench/common.py: `python bench/<script>.py` puts bench/ first on sys.path
from common import preset_parser, print_figures, say, session

from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.teacher_pass.config import CorpusSource, TeacherSpec
from mdkd.pipeline.teacher_pass.corpus import read_language
from mdkd.pipeline.teacher_pass.teachers import inspect_teacher
from mdkd.stages import cache_inspect, cache_logits, evaluate
from mdkd.stages import train as train_stage
from mdkd.tiny_models import build_masked_lm, pretrain_masked_lm, train_tokenizer

DEFAULT_CORPUS = Path.home() / ".cache" / "mdkd" / "demo" / "quick" / "teacher_corpus"  # `mdkd demo --quick`
TEACHERS = {"de": ("de_teacher", "wordpiece", "bert"), "ru": ("ru_teacher", "unigram", "xlm-roberta")}
TEACHER_SIZES = {"hidden": 128, "layers": 2, "heads": 2}
MAX_LENGTH = 64
EVAL_FRACTION = 0.1
TOP_K, TEMPERATURES, TAU = 8, [1.0, 2.0], 2.0
USABLE = {"outside_mass": 0.02, "ce_gap_nats": 1.0, "agreement_factor": 5.0}
PRESETS = {
    "tiny": {"documents": 40, "teacher_steps": 10, "steps": 4, "vocab": 400},
    # 300 teacher steps left the top-8 holding 15 % (de) and 18 % (ru) of the mass at tau = 1 on the demo's text
    "small": {"documents": 1000, "teacher_steps": 300, "steps": 400, "vocab": 2000},
}
# variant -> (the cache it trains on, its loss keys); the dense one keeps every cached prediction (k' = all)
VARIANTS = {
    "untrained": ("top8", {"missing_mass": "support", "tail": "none"}),
    "rest": ("top8", {"missing_mass": "rest", "tail": "none"}),
    "renormalize": ("top8", {"missing_mass": "renormalize", "tail": "none"}),
    "support": ("top8", {"missing_mass": "support", "tail": "none"}),
    "support+tail": ("top8", {"missing_mass": "support", "tail": "sampled"}),
    "dense": ("dense", {"missing_mass": "support", "tail": "none"}),
}


def parse_args(argv=None):
    parser = preset_parser("Pure KD from weak teachers, per loss variant (see the module docstring).", PRESETS)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a folder holding de.txt and ru.txt")
    parser.add_argument("--documents", type=int, help="the students' slice: lines per language")
    parser.add_argument("--teacher-steps", type=int, help="pre-training steps of each teacher")
    parser.add_argument("--steps", type=int, help="training steps of each student")
    parser.add_argument("--tail-samples", type=int, default=16, help="tail draws per masked position (top-8 cache)")
    parser.add_argument("--tail-temperature", type=float, choices=TEMPERATURES, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (teachers, caches, runs)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not all((args.corpus / f"{language}.txt").is_file() for language in TEACHERS):
        parser.exit(2, f"error: no de.txt and ru.txt in {args.corpus}: pass --corpus DIR, or run `mdkd demo --quick`\n")
    return args


# ---------------------------------------------------------------- 1. the teachers


def split_documents(corpus: Path, language: str) -> tuple[list[str], list[str]]:
    """(training, held-out) texts, read by stage one's reader, so with the doc_ids the caches will hold."""
    source = CorpusSource.model_validate({"language": language, "path": str(corpus / f"{language}.txt")})
    training, held = [], []
    for document in read_language([source]):
        (held if held_out(document.doc_id, EVAL_FRACTION) else training).append(document.text)
    return training, held


def distinct_tokens(folder: Path, language: str) -> int:
    """The teacher's ids that stage one counts once (twins share a canonical token): the largest top_k it takes."""
    info, problems = inspect_teacher(TeacherSpec(name="t", model=str(folder), languages=[language]), 1, MAX_LENGTH)
    assert info is not None and not problems, problems
    return len(info.representatives)


def build_teachers(work: Path, args) -> dict[str, dict]:
    """Both teachers, pre-trained and saved to work/<name>; returns each one's record."""
    texts = {language: split_documents(args.corpus, language)[0] for language in TEACHERS}
    # A cache has one top_k for all its teachers, so the dense cache holds every token of both only if they have
    # as many distinct tokens: shrink the larger vocabulary by the difference until they match.
    vocab, distinct, built, todo = dict.fromkeys(TEACHERS, args.vocab), {}, {}, list(TEACHERS)
    for _ in range(10):
        for language in todo:
            name, family, architecture = TEACHERS[language]
            tokenizer = train_tokenizer(family, texts[language], vocab[language], work / name)
            model = build_masked_lm(architecture, tokenizer, work / name, seed=args.seed, **TEACHER_SIZES)
            built[language] = tokenizer, model
            distinct[language] = distinct_tokens(work / name, language)
        smallest = min(distinct.values())
        todo = [language for language in TEACHERS if distinct[language] > smallest]
        if not todo:
            break
        for language in todo:
            vocab[language] -= distinct[language] - smallest
    else:
        raise RuntimeError(f"the teachers' distinct tokens do not match: {distinct}")
    records = {}
    for language, (tokenizer, model) in built.items():
        name, _, architecture = TEACHERS[language]
        started = time.perf_counter()
        losses = pretrain_masked_lm(
            model, tokenizer, texts[language], args.teacher_steps, max_length=MAX_LENGTH, seed=args.seed
        )
        model.save_pretrained(work / name)
        records[language] = {
            "name": name,
            "architecture": architecture,
            "vocabulary": len(tokenizer),
            "distinct_tokens": distinct[language],
            "training_documents": len(texts[language]),
            "steps": args.teacher_steps,
            "last_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": time.perf_counter() - started,
        }
    return records


# ---------------------------------------------------------------- 2. stage one, three times


def write_slice(work: Path, args) -> Path:
    """The first lines of each language, verbatim: same file names and line numbers, so the same doc_ids (and
    held-out documents) as in the teachers' corpus."""
    folder = work / "slice"
    folder.mkdir()
    for language in TEACHERS:
        lines = (args.corpus / f"{language}.txt").read_bytes().splitlines(keepends=True)
        (folder / f"{language}.txt").write_bytes(b"".join(lines[: args.documents]))
    return folder


def build_cache(work: Path, corpus: Path, name: str, top_k: int, tail_samples: int, args) -> dict:
    config = {
        "corpus": [{"language": language, "path": str(corpus / f"{language}.txt")} for language in TEACHERS],
        "teachers": [
            {"name": name_, "model": str(work / name_), "languages": [language]}
            for language, (name_, _, _) in TEACHERS.items()
        ],
        "masking": {"seed": args.seed},  # one seed for every cache: the same positions in each
        "max_length": MAX_LENGTH,
        "top_k": top_k,
        "temperatures": TEMPERATURES,
        "tail_samples": tail_samples,
        "tail_temperature": args.tail_temperature,
        "dtype": "fp32",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.perf_counter()
    cache_logits.run(path, work / name)
    totals = CacheReader(work / name).manifest.totals
    return {
        "dir": str(work / name),
        "top_k": top_k,
        "tail_samples": tail_samples,
        "masked_positions": totals.masked_positions,
        "bytes": totals.bytes,
        "bytes_per_position": totals.bytes / totals.masked_positions,
        "seconds": time.perf_counter() - started,
    }


def top_k_mass(cache_dir: str) -> dict[str, dict]:
    """`mdkd cache inspect`'s mean top-k mass per language, at tau = 1 and at each cached tau."""
    return {
        row["language"]: {key: value for key, value in row.items() if key.startswith("mean_topk_mass")}
        for row in cache_inspect.collect(Path(cache_dir)).rows
    }


# ---------------------------------------------------------------- 3. and 4. students, scored on the dense cache


def train_and_score(work: Path, variant: str, caches: dict, args) -> dict:
    cache_name, loss = VARIANTS[variant]
    untrained = variant == "untrained"
    steps = 1 if untrained else args.steps
    config = {
        "teachers": {language: name for language, (name, _, _) in TEACHERS.items()},
        "student": {"preset": "tiny"},
        "loss": {
            "temperature": TAU,
            "top_k": caches[cache_name]["top_k"],
            "alpha": {"schedule": "constant", "start": 1.0},  # pure KD: nothing but the teacher shapes the student
            **loss,
        },
        "train": {
            "steps": steps,
            "micro_batch_size": 32,
            "lr": 1e-12 if untrained else 1e-3,
            "checkpoint_every": steps,
            "eval_fraction": EVAL_FRACTION,
            "seed": args.seed,
        },
        "precision": "fp32",
    }
    path = work / f"train-{variant}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run = RunFolder(work / "runs" / variant)
    started = time.perf_counter()
    train_stage.run(path, Path(caches[cache_name]["dir"]), run.path)
    trained = time.perf_counter()
    report = evaluate.run(
        run.student_dir, cache_dir=Path(caches["dense"]["dir"]), heldout_run=run.path, out_file=run.eval_file()
    )
    windows = {}
    for language, (name, _, _) in TEACHERS.items():
        scored = report["languages"][language]["windows"][name]
        model, teacher, mask = scored["model"], scored["teacher"], scored["by_kind"]["mask"]
        windows[language] = {
            "positions": scored["positions"],
            "left_out": scored["left_out"],
            "outside_mass": model["outside_mass"],
            "student_ce": math.log(model["perplexity"]),
            "teacher_ce": math.log(teacher["perplexity"]),  # exact: the dense cache holds every token
            "agreement": model["agreement"],
            "kl": model["kl"],  # exact too on the dense cache: KL(teacher || student) at tau = 1
            "mask_positions": mask["positions"],
            "mask_accuracy": mask["model"].get("accuracy"),
            "teacher_mask_accuracy": mask["teacher"].get("accuracy"),
        }
    return {"train_s": trained - started, "eval_s": time.perf_counter() - trained, "windows": windows}


def usable(scored: dict, baseline_agreement: float) -> bool:
    return (
        scored["outside_mass"] <= USABLE["outside_mass"]
        and scored["student_ce"] - scored["teacher_ce"] <= USABLE["ce_gap_nats"]
        and scored["agreement"] >= USABLE["agreement_factor"] * baseline_agreement
    )


def measure(args, work: Path) -> dict:
    seconds = {}
    started = time.perf_counter()
    teachers = build_teachers(work, args)
    seconds["teachers"] = time.perf_counter() - started
    corpus = write_slice(work, args)
    dense_k = teachers["de"]["distinct_tokens"]  # both teachers have this many (build_teachers)
    caches = {
        "top8": build_cache(work, corpus, "top8", TOP_K, args.tail_samples, args),
        "top8_no_tail": build_cache(work, corpus, "top8_no_tail", TOP_K, 0, args),
        "dense": build_cache(work, corpus, "dense", dense_k, 0, args),
    }
    masses = {name: top_k_mass(caches[name]["dir"]) for name in ("top8", "dense")}
    for language, record in teachers.items():
        record["top8_mass"] = masses["top8"][language]
        record["dense_mass"] = masses["dense"][language]["mean_topk_mass"]  # 1 when every token is cached
    students = {variant: train_and_score(work, variant, caches, args) for variant in VARIANTS}
    baseline = {language: scored["agreement"] for language, scored in students["untrained"]["windows"].items()}
    for student in students.values():
        for language, scored in student["windows"].items():
            scored["usable"] = usable(scored, baseline[language])
    return {
        "preset": args.preset,
        "corpus": str(args.corpus),
        "documents": args.documents,
        "student_steps": args.steps,
        "tail_samples": args.tail_samples,
        "tail_temperature": args.tail_temperature,
        "usable_if": USABLE,
        "teachers": teachers,
        "caches": {name: {k: v for k, v in cache.items() if k != "dir"} for name, cache in caches.items()},
        "students": students,
        "seconds": {
            **seconds,
            **{f"cache_{name}": cache["seconds"] for name, cache in caches.items()},
            **{f"train_{name}": s["train_s"] for name, s in students.items()},
            **{f"eval_{name}": s["eval_s"] for name, s in students.items()},
            "total": time.perf_counter() - started,
        },
    }


def report(figures: dict) -> None:
    for teacher in figures["teachers"].values():
        mass = teacher["top8_mass"]
        say(
            f"teacher {teacher['name']} ({teacher['architecture']}, {teacher['distinct_tokens']} distinct tokens, "
            f"{teacher['steps']} steps on {teacher['training_documents']} documents, {teacher['seconds']:.0f} s): "
            f"top-8 mass {mass['mean_topk_mass']:.3f} at tau 1 (aim: 0.15-0.25), {mass['mean_topk_mass_tau2']:.3f}"
            f" at tau 2; dense cache mass {teacher['dense_mass']:.4f}"
        )
    for name, cache in figures["caches"].items():
        say(
            f"cache {name}: top_k {cache['top_k']}, tail {cache['tail_samples']}, {cache['masked_positions']} "
            f"masked positions, {cache['bytes_per_position']:.1f} bytes/position ({cache['seconds']:.0f} s)"
        )
    headers = ["variant", "lang", "pos", "outside", "CE", "teacher CE", "agree", "mask acc s/t", "KL", "usable"]
    lines = [headers]
    for variant, student in figures["students"].items():
        for language, s in student["windows"].items():
            accuracy = f"{s['mask_accuracy'] or 0:.3f}/{s['teacher_mask_accuracy'] or 0:.3f}"
            lines.append(
                [variant, language, s["positions"], f"{s['outside_mass']:.4f}", f"{s['student_ce']:.2f}"]
                + [f"{s['teacher_ce']:.2f}", f"{s['agreement']:.3f}", accuracy, f"{s['kl']:.2f}"]
                + ["yes" if s["usable"] else "no"]
            )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    for line in lines:
        say("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    say(
        f"usable: outside <= {USABLE['outside_mass']}, CE - teacher CE <= {USABLE['ce_gap_nats']} nat, agreement >= "
        f"{USABLE['agreement_factor']:g} x the untrained student's; total {figures['seconds']['total']:.0f} s"
    )
    print_figures(figures)


def main(argv=None) -> None:
    args = parse_args(argv)
    with session("mdkd-bench-targets-", keep=args.keep) as scratch:
        figures = measure(args, scratch)
    report(figures)


if __name__ == "__main__":
    main()
