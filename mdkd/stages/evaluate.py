"""`mdkd eval TARGET`: does the student keep what each teacher knows? Per language, on held-out data.

TARGET is a run folder (its exported student, its held-out documents and its cache) or any HF masked LM folder
(then --cache and --heldout RUN or --eval-fraction say what to score it on), so a teacher or an outside model is
scored on exactly the data a student is.

Recipe: load the model; for every language and every teacher that cached it, score the model on that teacher's
held-out windows (the exact masked inputs the teacher saw, mapped into the model's vocabulary by canonical
token) and read the teacher's own metrics from the cache; then score the model on the raw held-out text with its
own tokenizer and fresh masking; save eval.json and print a table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mdkd.pipeline.cache.documents import fraction_rule, load_held_out
from mdkd.pipeline.cache.manifest import MANIFEST_NAME, Manifest
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.vocab import TeacherVocabulary, map_by_canonical
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.evaluation import MetricSums, held_out_windows, model_sums, score_windows
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.teacher_pass.config import CorpusSource, MaskingConfig
from mdkd.pipeline.teacher_pass.corpus import Document, read_language
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.teachers import ADAPTERS, masked_logits
from mdkd.pipeline.teacher_pass.windows import padded_inputs, prepare_unit

RAW_TEXT_SEED = 1234  # fresh masking of raw text: a fixed seed, so two models see the same masked text


def run(target: Path, *, cache_dir: Path | None = None, heldout_run: Path | None = None,
        eval_fraction: float | None = None, max_rows: int = 2000, out_file: Path | None = None) -> dict:
    """Score TARGET (a run folder or a model folder); write eval.json (a run's by default) and return the report."""
    model_dir, cache_dir, is_held_out, out_file = _resolve(target, cache_dir, heldout_run, eval_fraction, out_file)
    cache = CacheReader(cache_dir)
    manifest = cache.manifest
    model, tokenizer = _load_model(model_dir)
    adapter = ADAPTERS.get(model.config.model_type)
    own = TeacherVocabulary.from_tokenizer("model", model_dir, tokenizer)
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0

    def logits_fn(input_ids, attention_mask, rows, cols):
        return masked_logits(model, adapter, input_ids, attention_mask, rows, cols, torch.device("cpu"))

    languages: dict[str, dict] = {}
    pooled: dict[str, MetricSums] = {}  # the model over every teacher's windows of a language
    for name, entry in manifest.teachers.items():
        target_map = map_by_canonical(TeacherVocabulary.from_cache(cache, name), own)
        input_map = np.where(target_map < 0, unk, target_map)
        for language in entry.languages:
            windows = held_out_windows(cache, name, language, is_held_out, max_rows)
            if not windows.rows:
                continue
            student, teacher = score_windows(logits_fn, windows, input_map, target_map, manifest.temperatures,
                                             pad_id=tokenizer.pad_token_id or 0)
            languages.setdefault(language, {"windows": {}})["windows"][name] = {"model": student.result(), "teacher": teacher.result()}
            pooled.setdefault(language, MetricSums()).add(student)
    if not languages:
        raise UserError(f"no held-out windows in {cache_dir} (raise eval_fraction when training, or pass --eval-fraction)")
    for language, result in languages.items():
        result["model"] = pooled[language].result()
        result["raw_text"] = _raw_text(model, adapter, tokenizer, manifest, language, is_held_out, max_rows)
    report = {"model": str(model_dir), "cache": str(cache_dir), "languages": languages}
    if out_file is not None:
        write_json_atomic(out_file, report)
    return report


def _resolve(target: Path, cache_dir, heldout_run, eval_fraction, out_file):
    """(model folder, cache, held-out rule, where eval.json goes) for a run folder or a plain model folder."""
    if (target / "run.json").exists():
        status = json.loads((target / "run.json").read_text(encoding="utf-8"))
        if not (target / "student" / "config.json").exists():
            raise UserError(f"run {target} has no exported student yet (let `mdkd train` finish, or resume it)")
        cache_dir = cache_dir or Path(status.get("cache", ""))
        heldout_run = heldout_run or target
        out_file = out_file or target / "eval.json"
        model_dir = target / "student"
    elif (target / "config.json").exists():
        if cache_dir is None:
            raise UserError(f"{target} is a model folder, not a run: give --cache DIR to score it on")
        model_dir = target
    else:
        raise UserError(f"{target} is neither an mdkd run folder nor a model folder (no run.json or config.json)")
    if not cache_dir or not (Path(cache_dir) / MANIFEST_NAME).exists():
        raise UserError(f"cache {cache_dir} not found (give --cache DIR)")
    if heldout_run is not None:
        rule = load_held_out(Path(heldout_run))
    elif eval_fraction is not None:
        rule = fraction_rule(eval_fraction)
    else:
        raise UserError("say which documents are held out: --heldout RUN (that run's) or --eval-fraction F")
    return model_dir, Path(cache_dir), rule, out_file


def _load_model(folder: Path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
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
    sources = [CorpusSource.model_validate(s) for s in manifest.config["corpus"] if s["language"] == language]
    if any(s.path is not None and not Path(s.path).exists() for s in sources):
        return {"skipped": "the corpus files recorded in the cache are no longer there"}
    documents: list[Document] = []
    for document in read_language(sources):
        if is_held_out(document.doc_id):
            documents.append(document)
            if len(documents) >= max_rows:
                break
    if not documents:
        return {"positions": 0}
    masker = Masker(MaskingConfig(**{**manifest.masking, "seed": RAW_TEXT_SEED, "copies": 1}),
                    tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    unit = prepare_unit(documents, tokenizer, masker, manifest.max_length, copies=1)
    sums = MetricSums()
    for start in range(0, len(unit.rows), 32):
        batch = unit.rows[start : start + 32]
        input_ids, attention_mask, rows, cols = padded_inputs(batch, tokenizer.pad_token_id or 0)
        labels = torch.from_numpy(np.concatenate([r.labels for r in batch]).astype(np.int64))
        with torch.no_grad():
            logits = masked_logits(model, adapter, input_ids, attention_mask, rows, cols, torch.device("cpu"))
        sums.add(model_sums(logits, labels))
    return sums.result()


def render(report: dict) -> str:
    """Rows: languages; columns: the model, then each teacher on its own windows."""
    teachers = sorted({name for result in report["languages"].values() for name in result["windows"]})
    headers = ["language", "model acc", "model ppl", "agree", "KL", "raw acc", "raw ppl"]
    headers += [f"{name} acc" for name in teachers] + [f"{name} ppl>=" for name in teachers]
    lines = [headers]
    for language in sorted(report["languages"]):
        result = report["languages"][language]
        model, raw = result["model"], result["raw_text"]
        row = [language, _f(model.get("accuracy")), _f(model.get("perplexity"), 1), _f(model.get("agreement")),
               _f(model.get("kl")), _f(raw.get("accuracy")), _f(raw.get("perplexity"), 1)]
        row += [_f(result["windows"].get(n, {}).get("teacher", {}).get("accuracy")) for n in teachers]
        row += [_f(result["windows"].get(n, {}).get("teacher", {}).get("perplexity"), 1) for n in teachers]
        lines.append(row)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
