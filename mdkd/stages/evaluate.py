"""`mdkd eval TARGET`: does the student keep what each teacher knows? Per language, on held-out data.

TARGET is a run folder (its exported student, its held-out documents and its cache) or any HF masked LM folder
(then --cache and --heldout RUN or --eval-fraction say what to score it on), so a teacher or an outside model is
scored on exactly the data a student is.

Recipe: load the model; choose the teachers whose windows it is scored on (a run's: the teachers its config
trained it with, per language; a plain model folder, or --all-teachers: every teacher that cached the
language); for each language and each of those teachers, score the model on the teacher's held-out windows (the
exact masked inputs the teacher saw, mapped into the model's vocabulary by canonical token) and read the
teacher's own metrics from the cache on exactly the same positions, split by position kind (mask / random /
keep); then score the model on the raw held-out text with its own tokenizer and fresh masking; save eval.json and
print a table. A run's eval.json goes into its student's model card too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from mdkd.pipeline.cache.documents import fraction_rule
from mdkd.pipeline.cache.manifest import Manifest
from mdkd.pipeline.cache.reader import CacheReader, is_cache
from mdkd.pipeline.distill.model_card import write_model_card
from mdkd.pipeline.distill.plan import check_against_cache, teachers_by_language
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distill.vocab import TeacherVocabulary, map_by_canonical
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.evaluation import (
    KINDS,
    Comparison,
    MetricSums,
    compare_on_windows,
    held_out_windows,
    position_metrics,
)
from mdkd.pipeline.files import ensure_writable, write_json_atomic
from mdkd.pipeline.masked_lm import ADAPTERS, masked_logits
from mdkd.pipeline.teacher_pass.config import CorpusSource, MaskingConfig
from mdkd.pipeline.teacher_pass.corpus import Document, read_language
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.windows import padded_inputs, prepare_unit

RAW_TEXT_SEED = 1234  # fresh masking of raw text: a fixed seed, so two models see the same masked text
RAW_TEXT_BATCH = 32  # windows per forward when scoring raw text


def run(
    target: Path,
    *,
    cache_dir: Path | str | None = None,
    heldout_run: Path | None = None,
    eval_fraction: float | None = None,
    max_rows: int = 2000,
    out_file: Path | None = None,
    all_teachers: bool = False,
) -> dict:
    """Score TARGET (a run folder or a model folder); write eval.json (a run's by default) and return the report."""
    model_dir, cache_dir, is_held_out, out_file = _resolve(target, cache_dir, heldout_run, eval_fraction, out_file)
    if out_file is not None:
        ensure_writable(out_file.parent)  # before the scoring, whose result would be lost
    cache = CacheReader(cache_dir)
    manifest = cache.manifest
    scope, teachers_of = teacher_scope(target, manifest, all_teachers)
    scored = sorted({name for names in teachers_of.values() for name in names})
    cache.require_intact(
        [s for language, names in teachers_of.items() for name in names for s in manifest.shards_of(name, language)],
        scored,
    )
    model, tokenizer = _load_model(model_dir)
    adapter = ADAPTERS.get(model.config.model_type)
    own = TeacherVocabulary.from_tokenizer("model", model_dir, tokenizer)
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0

    def logits_fn(input_ids, attention_mask, rows, cols):
        return masked_logits(model, adapter, input_ids, attention_mask, rows, cols, torch.device("cpu"))

    maps: dict[str, np.ndarray] = {}  # teacher -> its ids in the model's (-1: the model cannot spell it)
    languages: dict[str, dict] = {}
    for language, names in teachers_of.items():
        summary, windows_scored = Comparison(), {}
        for name in names:
            if name not in maps:
                maps[name] = map_by_canonical(TeacherVocabulary.from_cache(cache, name), own.canonical)
            target_map = maps[name]
            input_map = np.where(target_map < 0, unk, target_map)
            windows = held_out_windows(cache, name, language, is_held_out, max_rows)
            if not windows.rows:
                continue
            specials = manifest.teachers[name].special_token_ids
            comparison = compare_on_windows(
                logits_fn,
                windows,
                input_map,
                target_map,
                manifest.temperatures,
                specials.get("mask"),
                pad_id=tokenizer.pad_token_id or 0,
                unk_id=specials.get("unk"),
            )
            windows_scored[name] = comparison.result()
            summary.add(comparison)
        if windows_scored:
            languages[language] = {
                "teachers": list(windows_scored),
                "windows": windows_scored,
                "summary": summary.result(),
            }
    if not languages:
        raise UserError(
            f"no held-out windows in {cache_dir} for the teachers scored ({scope}; raise eval_fraction "
            "when training, or pass --eval-fraction)"
        )
    for language, result in languages.items():
        result["raw_text"] = _raw_text(model, adapter, tokenizer, manifest, language, is_held_out, max_rows)
    report = {"model": str(model_dir), "cache": str(cache_dir), "scope": scope, "languages": languages}
    if out_file is not None:
        write_json_atomic(out_file, report)
        run_folder = RunFolder(target)
        if run_folder.is_run() and out_file.resolve() == run_folder.eval_file().resolve():
            write_model_card(run_folder, manifest)  # the card shows the run's eval.json
    return report


def teacher_scope(target: Path, manifest: Manifest, all_teachers: bool) -> tuple[str, dict[str, list[str]]]:
    """(what the scope is, {language: the teachers whose windows are scored, in cache order}).

    A run folder: the teachers it was trained with, as train recorded them (for a run older than that record, as
    its resolved config selects them); anything else, or `all_teachers`: every teacher that cached the language."""
    run_folder = RunFolder(target)
    if all_teachers or not run_folder.is_run():
        return "all cached teachers", manifest.languages()
    selection = run_folder.teachers()
    if selection is None:
        if not run_folder.has_config():
            raise UserError(
                f"run {target} records neither its teachers nor its config, so the teachers it was trained with "
                "are unknown (pass --all-teachers to score every cached teacher)"
            )
        selection, _ = check_against_cache(run_folder.config(), manifest)
    scope = teachers_by_language(selection, manifest)
    if not scope:
        raise UserError(
            f"the cache holds none of the teachers run {target} was trained with "
            "(give the run's cache, or pass --all-teachers)"
        )
    return "the teachers the run was trained with", scope


def _resolve(target: Path, cache_dir, heldout_run, eval_fraction, out_file):
    """(model folder, cache, held-out rule, where eval.json goes) for a run folder or a plain model folder."""
    run_folder = RunFolder(target)
    if run_folder.is_run():
        if not run_folder.has_student():
            raise UserError(f"run {target} has no exported student yet (let `mdkd train` finish, or resume it)")
        cache_dir = cache_dir or run_folder.cache_dir()
        heldout_run = heldout_run or target
        out_file = out_file or run_folder.eval_file()
        model_dir = run_folder.student_dir
    elif (target / "config.json").exists():
        if cache_dir is None:
            raise UserError(f"{target} is a model folder, not a run: give --cache DIR to score it on")
        model_dir = target
    else:
        raise UserError(f"{target} is neither an mdkd run folder nor a model folder (no run record or config.json)")
    if not cache_dir or not is_cache(cache_dir):
        raise UserError(f"cache {cache_dir} not found (give --cache DIR)")
    if heldout_run is not None:
        rule = RunFolder(heldout_run).held_out_rule()
    elif eval_fraction is not None:
        rule = fraction_rule(eval_fraction)
    else:
        raise UserError("say which documents are held out: --heldout RUN (that run's) or --eval-fraction F")
    return model_dir, cache_dir, rule, out_file


def _load_model(folder: Path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        with transformers_console(Ranks.from_env()):
            model = AutoModelForMaskedLM.from_pretrained(folder).eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for an unusable folder
        raise UserError(f"cannot load a masked LM and tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
    if not (folder / "tokenizer.json").exists():
        raise UserError(f"{folder} has no tokenizer.json (mdkd compares tokens through a fast tokenizer's file)")
    return model, tokenizer


def _raw_text(model, adapter, tokenizer, manifest: Manifest, language: str, is_held_out, max_rows: int) -> dict:
    """The model on held-out raw text with its own tokenizer and fresh masking: the merged tokenizer's view.

    The corpus is re-read through stage one's reader from the sources the manifest records: eval compares a model
    with the teachers, so it reads both stages' records (stage two itself reads only the cache)."""
    recorded = [source for source in manifest.config["corpus"] if source["language"] == language]
    try:  # a source is checked as stage one checked it: a local file or an object on its store must exist
        sources = [CorpusSource.model_validate(source) for source in recorded]
    except ValidationError:
        return {"skipped": "the corpus files recorded in the cache are no longer there"}
    documents: list[Document] = []
    for document in read_language(sources):
        if is_held_out(document.doc_id):
            documents.append(document)
            if len(documents) >= max_rows:
                break
    if not documents:
        return {"positions": 0}
    masker = Masker(
        MaskingConfig(**{**manifest.masking, "seed": RAW_TEXT_SEED, "copies": 1}),
        tokenizer.mask_token_id,
        set(tokenizer.all_special_ids),
        len(tokenizer),
    )
    unit = prepare_unit(documents, tokenizer, masker, manifest.max_length, copies=1)
    sums = MetricSums()
    for start in range(0, len(unit.rows), RAW_TEXT_BATCH):
        batch = unit.rows[start : start + RAW_TEXT_BATCH]
        input_ids, attention_mask, rows, cols = padded_inputs(batch, tokenizer.pad_token_id or 0)
        labels = torch.from_numpy(np.concatenate([r.labels for r in batch]).astype(np.int64))
        with torch.no_grad():
            logits = masked_logits(model, adapter, input_ids, attention_mask, rows, cols, torch.device("cpu"))
        sums.add(position_metrics(logits, labels).sums())
    return sums.result()


def render(report: dict) -> str:
    """One row per (language, teacher): the model and the teacher on the same positions of that teacher's windows.
    The headline is at the positions replaced by [MASK], the task the model is for: at kept positions the input
    shows the answer, so a figure pooled over all positions rewards copying. Then all positions and each other
    kind (model/teacher); when a language has several teachers, their position-weighted summary; the model's
    raw-text figures on each language's first row."""
    headers = [
        "language",
        "windows",
        "[MASK] positions",
        "left out",
        "[MASK] acc",
        "teacher [MASK] acc",
        "ratio",
        "all acc",
        *[f"{kind} acc" for kind in KINDS if kind != "mask"],
        "agree",
        "KL",
        "outside",
        "ppl",
        "teacher ppl>=",
        "raw acc",
        "raw ppl",
    ]
    lines = [headers]
    for language in sorted(report["languages"]):
        result = report["languages"][language]
        raw = result.get("raw_text", {})
        entries = list(result["windows"].items())
        if len(entries) > 1:
            entries.append(("all: " + "+".join(result["teachers"]), result["summary"]))
        for index, (name, scored) in enumerate(entries):
            model, teacher, masked = scored["model"], scored["teacher"], scored["by_kind"]["mask"]
            row = [
                language,
                name,
                masked["positions"],
                masked["left_out"],
                _f(masked["model"].get("accuracy")),
                _f(masked["teacher"].get("accuracy")),
                _f(masked.get("accuracy_ratio"), 2),
                _pair(scored),
            ]
            row += [_pair(scored["by_kind"][kind]) for kind in KINDS if kind != "mask"]
            row += [
                _f(model.get("agreement")),
                _f(model.get("kl")),
                _f(model.get("outside_mass")),
                _f(model.get("perplexity"), 1),
                _f(teacher.get("perplexity"), 1),
            ]
            row += [_f(raw.get("accuracy")), _f(raw.get("perplexity"), 1)] if index == 0 else ["", ""]
            lines.append(row)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    table = "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    return (
        f"Scored on the held-out windows of {report.get('scope', 'every cached teacher')}; model and teacher on "
        "the same positions (left out: labels the model cannot spell); the headline is at positions replaced by "
        "[MASK]; all/<kind> acc = model/teacher; outside: the model's mass on tokens the teacher cannot emit.\n" + table
    )


def _pair(scored: dict) -> str:
    if not scored["positions"]:
        return "-"
    return f"{_f(scored['model'].get('accuracy'))}/{_f(scored['teacher'].get('accuracy'))}"


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
