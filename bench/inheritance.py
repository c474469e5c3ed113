"""What inheriting a teacher's weights buys: held-out accuracy at [MASK] positions of four students, beside the
teachers, per language and per teacher window. It prints figures and is not a test.

From one cache and one train config (the from-scratch student, e.g. the demo's `configs/mono_taught.yaml`), with
`--body` a teacher of the cache (the multilingual one, MergeDistill's setting):

- `inherited_step0`: the student `student.init: {teacher: BODY}` builds, before any optimiser step (exported and
  scored as it is, no run);
- `inherited_kd`: that student trained like the config's (same teachers, loss, data, steps);
- `inherited_mlm`: the same with alpha 0 throughout (MLM only, the same windows);
- `scratch_kd`: the config as it is.

Each is scored by `mdkd eval` on every cached teacher's held-out windows (those of `inherited_kd`'s run), and the
figure reported is the accuracy at positions stage one replaced by the mask token, with the teacher's on the same
positions. It uses mdkd's public stages only:

    python bench/inheritance.py --cache CACHE --config mono_taught.yaml --body multi --out /tmp/inherit

Each `--sentence` (with `[MASK]` in it) is filled by the body (its own tokenizer) and by the step-0 student (the
student's), top-3 each. The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.config import BODY_DECIDES, InheritConfig
from mdkd.pipeline.distill.inherit import inherit_student
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distill.student import MaskedLMStudent, export_student
from mdkd.pipeline.distill.vocab import Alignment
from mdkd.stages import evaluate, train


def variants(base: dict, body: str) -> dict[str, dict]:
    """The trained students' configs, derived from the from-scratch one."""
    inherited = copy.deepcopy(base)
    inherited["student"] = {k: v for k, v in base.get("student", {}).items() if k not in BODY_DECIDES}
    inherited["student"]["init"] = {"teacher": body}
    mlm = copy.deepcopy(inherited)
    mlm.setdefault("loss", {})["alpha"] = {"schedule": "constant", "start": 0.0}
    return {"inherited_kd": inherited, "inherited_mlm": mlm, "scratch_kd": copy.deepcopy(base)}


def mask_accuracies(report: dict) -> dict:
    """{language: {teacher window: {"student", "teacher", "positions"}}} at [MASK] positions."""
    figures = {}
    for language, result in report["languages"].items():
        for window, scored in result["windows"].items():
            masked = scored["by_kind"]["mask"]
            figures.setdefault(language, {})[window] = {
                "student": masked["model"].get("accuracy"),
                "teacher": masked["teacher"].get("accuracy"),
                "positions": masked["positions"],
            }
    return figures


def step0_student(cache_dir: Path, run: Path, body: str, out: Path) -> Path:
    """The inherited student as `mdkd train` builds it before its first step, over `run`'s merged vocabulary."""
    cache, folder = CacheReader(cache_dir), RunFolder(run)
    teachers = folder.teachers()
    names = [name for name in cache.manifest.teachers if any(name in chosen for chosen in teachers.values())]
    alignment = Alignment.load(folder.vocab_dir, names)
    inheritance = inherit_student(InheritConfig(teacher=body), cache, alignment, cache.manifest.shards, seed=0)
    export_student(MaskedLMStudent(inheritance.model), alignment.tokens, alignment.lowercase, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the from-scratch student's train config")
    parser.add_argument("--body", required=True, help="the cached teacher the inherited students start from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-rows", type=int, default=2000, help="held-out rows per teacher and language")
    parser.add_argument(
        "--sentence", action="append", default=[], help="a sentence with [MASK] for fill-mask (repeatable)"
    )
    args = parser.parse_args()
    base = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    seconds, reports = {}, {}
    for name, config in variants(base, args.body).items():
        path = args.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        start = time.perf_counter()
        train.run(path, args.cache, args.out / name)
        seconds[name] = round(time.perf_counter() - start, 1)
    held_out = args.out / "inherited_kd"
    model_dirs = {"inherited_step0": step0_student(args.cache, held_out, args.body, args.out / "inherited_step0")}
    trained = ("inherited_kd", "inherited_mlm", "scratch_kd")
    model_dirs.update({name: RunFolder(args.out / name).student_dir for name in trained})
    for name, folder in model_dirs.items():
        report = evaluate.run(
            folder, cache_dir=args.cache, heldout_run=held_out, max_rows=args.max_rows, out_file=None, all_teachers=True
        )
        reports[name] = mask_accuracies(report)
    print_table(reports)
    filled = fill_masks(CacheReader(args.cache).teacher(args.body).model, model_dirs["inherited_step0"], args.sentence)
    print(json.dumps({"body": args.body, "train_seconds": seconds, "mask_accuracy": reports, "fill_mask": filled}))


def fill_masks(body_dir: str, student_dir: Path, sentences: list[str]) -> list[dict]:
    """The top-3 of `fill-mask` for each sentence (`[MASK]` marks the gap), from the body with its own tokenizer
    and from the step-0 student with the student's."""
    from transformers import pipeline

    body, student = pipeline("fill-mask", model=body_dir), pipeline("fill-mask", model=str(student_dir))
    results = []
    for sentence in sentences:
        row = {"sentence": sentence}
        for name, fill in (("body", body), ("student", student)):
            text = sentence.replace("[MASK]", fill.tokenizer.mask_token)
            row[name] = [(guess["token_str"].strip(), round(guess["score"], 3)) for guess in fill(text, top_k=3)]
        print(f"{sentence}\n  body: {row['body']}\n  student: {row['student']}", file=sys.stderr)
        results.append(row)
    return results


def print_table(reports: dict) -> None:
    names = list(reports)
    first = reports[names[0]]
    header = ["language", "window", "positions", "teacher", *names]
    lines = [header]
    for language in sorted(first):
        for window, figures in first[language].items():
            row = [language, window, str(figures["positions"]), f"{figures['teacher']:.3f}"]
            row += [f"{reports[name][language][window]['student']:.3f}" for name in names]
            lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)), file=sys.stderr)


if __name__ == "__main__":
    main()
