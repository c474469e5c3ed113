"""The exported student's model card (README.md): where the student came from, in the Hub's format.

Written by `mdkd train` when it exports the student and again by `mdkd eval RUN`, which adds the per-language
table against the teachers. Everything in it comes from the run folder and the cache's manifest: the teachers
(model, revision, weights hash, the languages each taught), the cache identity, the resolved config, the merged
vocabulary (its size and how many of its tokens each teacher reaches, alone or shared), the inherited weights if
any, and the run's eval.json. The metadata block is built with huggingface_hub's `ModelCardData`, so the Hub
reads it as it writes it; the bytes depend on nothing but those inputs (no dates, no machine names).
"""

from __future__ import annotations

import json

import numpy as np

from mdkd import __version__
from mdkd.pipeline.cache.manifest import Manifest
from mdkd.pipeline.canonical import DROPPED
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distill.plan import check_against_cache
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.distill.student_tokenizer import STUDENT_SPECIALS
from mdkd.pipeline.distill.vocab import Alignment
from mdkd.pipeline.files import content_hash

TAGS = ["mdkd", "knowledge-distillation", "multilingual", "masked-lm"]


def write_model_card(run: RunFolder, manifest: Manifest) -> None:
    """(Re)write the model card of the run's exported student; a run folder without the merged vocabulary that
    `mdkd train` records (a model placed there by hand) gets none."""
    if Alignment.saved_in(run.vocab_dir):
        run.write_model_card(render_model_card(run, manifest))


def render_model_card(run: RunFolder, manifest: Manifest) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    config = run.config()
    selection = run.teachers() or check_against_cache(config, manifest)[0]  # a run older than teachers.json
    taught: dict[str, list[str]] = {}  # teacher -> the languages it taught, in selection order
    for language, weights in selection.items():
        for name in weights:
            taught.setdefault(name, []).append(language)
    alignment = Alignment.load(run.vocab_dir, list(taught))
    data = ModelCardData(
        language=sorted(selection),
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=TAGS,
    )
    sections = [
        f"# {run.title}\n\n"
        f"A masked language model distilled by mdkd {__version__} from {len(taught)} "
        f"teacher(s) by task-agnostic knowledge distillation on their cached top-k predictions. It loads with "
        "`AutoModelForMaskedLM` and `pipeline('fill-mask')`.",
        _teachers(manifest, selection, taught),
        _cache(manifest),
        _vocabulary(alignment, taught),
        _initial_weights(run.inheritance()),
        _evaluation(run.evaluation()),
        "## Training config\n\nThe resolved `mdkd train` config:\n\n```yaml\n" + dump_config(config) + "```",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    return str(card)


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _teachers(manifest: Manifest, selection: dict, taught: dict[str, list[str]]) -> str:
    rows = []
    for name, languages in taught.items():
        entry = manifest.teachers[name]
        weighted = ", ".join(
            language if selection[language][name] == 1.0 else f"{language} (weight {selection[language][name]:g})"
            for language in languages
        )
        rows.append(
            [f"`{name}`", f"`{entry.model}`", entry.revision or "-", f"`{entry.weights}`", entry.architecture, weighted]
        )
    return "## Teachers\n\n" + _table(["teacher", "model", "revision", "weights", "architecture", "taught"], rows)


def _cache(manifest: Manifest) -> str:
    identity = manifest.identity
    return (
        "## Cache\n\n"
        f"Trained from a cache of identity `{content_hash(identity)}` (config `{identity['config_hash']}`, "
        f"teacher precision {identity['dtype']}, top-{manifest.top_k}, windows of {manifest.max_length} tokens). "
        "Its identity in full (the hashes of its config, corpus files and teachers):\n\n"
        "```json\n" + json.dumps(identity, indent=1, sort_keys=True) + "\n```"
    )


def _vocabulary(alignment: Alignment, taught: dict[str, list[str]]) -> str:
    """The merged vocabulary's size, and per teacher how many student tokens its tokens map to, alone or shared."""
    reached = {}
    for name in taught:
        ids = alignment.id_maps[name]
        reached[name] = np.unique(ids[ids != DROPPED])
    counts = np.zeros(len(alignment.tokens), dtype=np.int64)
    for ids in reached.values():
        counts[ids] += 1
    counts[: len(STUDENT_SPECIALS)] = 0  # the specials are the student's own
    rows = [
        [
            f"`{name}`",
            alignment.stats["teachers"][name]["vocab_size"],
            int((counts[ids] > 0).sum()),
            int((counts[ids] == 1).sum()),
            alignment.stats["teachers"][name]["tokens_dropped"],
        ]
        for name, ids in reached.items()
    ]
    shared = int((counts > 1).sum())
    return (
        "## Vocabulary\n\n"
        f"{len(alignment.tokens)} tokens: {len(STUDENT_SPECIALS)} special tokens and the union of the teachers' "
        f"tokens in canonical (WordPiece) form ({alignment.stats['union_size']} before any size cap); "
        f"{shared} of them come from more than one teacher. The tokenizer "
        f"{'lowercases' if alignment.lowercase else 'keeps case'}.\n\n"
        + _table(["teacher", "its vocabulary", "student tokens it maps to", "only from it", "dropped by the cap"], rows)
    )


def _initial_weights(inheritance: dict | None) -> str:
    if inheritance is None:
        return "## Initial weights\n\nFrom scratch: the student inherited no teacher's weights."
    rows = ", ".join(f"{count} {path}" for path, count in inheritance["rows"].items())
    return (
        "## Initial weights\n\n"
        f"Inherited from teacher `{inheritance['body']}`: layers {inheritance['layers']} of its body; the "
        f"vocabulary rows were made as {rows}."
    )


def _evaluation(evaluation: dict | None) -> str:
    if evaluation is None:
        return "## Evaluation\n\nNot evaluated yet: `mdkd eval RUN` adds the table against the teachers here."
    rows = []
    for language in sorted(evaluation["languages"]):
        result = evaluation["languages"][language]
        entries = list(result["windows"].items())
        if len(entries) > 1:
            entries.append(("all: " + "+".join(result["teachers"]), result["summary"]))
        raw = result.get("raw_text", {})
        for index, (name, scored) in enumerate(entries):
            masked = scored["by_kind"]["mask"]
            model, teacher = scored["model"], scored["teacher"]
            rows.append(
                [
                    language,
                    name,
                    masked["positions"],
                    _figure(masked["model"].get("accuracy")),
                    _figure(masked["teacher"].get("accuracy")),
                    _figure(masked.get("accuracy_ratio")),
                    _figure(model.get("accuracy")),
                    _figure(teacher.get("accuracy")),
                    _figure(model.get("perplexity")),
                    _figure(teacher.get("perplexity")),
                    _figure(raw.get("accuracy")) if index == 0 else "",  # one figure per language
                ]
            )
    headers = [
        "language",
        "windows of",
        "[MASK] positions",
        "[MASK] accuracy",
        "teacher [MASK] accuracy",
        "ratio",
        "all-positions accuracy",
        "teacher all-positions accuracy",
        "perplexity",
    ]
    return (
        "## Evaluation\n\n"
        f"`mdkd eval` on held-out documents, on the windows of {evaluation.get('scope', 'every cached teacher')}: "
        "the student and the teacher predict the same masked positions (top-1 accuracy, first at the positions "
        "replaced by [MASK], then at all masked positions, where kept ones show the answer; the teacher's perplexity "
        "is a lower bound, from its cached top-k); raw-text accuracy is the student's on the held-out text with "
        "its own tokenizer and fresh masking (mdkd's docs/evaluation.md describes every figure).\n\n"
        + _table([*headers, "teacher perplexity", "raw-text accuracy"], rows)
    )


def _figure(value) -> str:
    """A figure as eval.json holds it, to 6 significant digits ('-' where there is none)."""
    return "-" if value is None else f"{value:.6g}"
