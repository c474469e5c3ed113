"""The demo's teachers, built here because no hub is reachable: one monolingual teacher per language with its own
WordPiece vocabulary, and one multilingual teacher with one shared SentencePiece-style (Unigram) vocabulary. Each is
a ModernBERT masked LM pre-trained on every window of its languages' text (held-out documents excluded), scored at
held-out [MASK] positions against always predicting the most frequent token, and saved as an ordinary HF folder
with its pre-training record beside it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from mdkd.demo.settings import MULTI, DemoSettings, mono
from mdkd.pipeline.cache.documents import held_out
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.files import write_json_atomic
from mdkd.pipeline.teacher_pass.config import CorpusSource
from mdkd.pipeline.teacher_pass.corpus import read_language
from mdkd.tiny_models import build_masked_lm, masked_lm_accuracy, pretrain_masked_lm, train_tokenizer

TEACHER_ARCHITECTURE = "modernbert"  # pre-norm: leaves the frequent-token plateau fast (see pretrain_masked_lm)
PRETRAINING = "pretraining.json"  # beside each teacher: its steps, time, and held-out accuracy against the bar
HELD_OUT_DOCUMENTS = 400  # per language for a teacher's own accuracy: thousands of [MASK] positions


def _split_documents(folder: Path, language: str, fraction: float) -> tuple[list[str], list[str]]:
    """A language's (training, held-out) documents, read by stage one's corpus reader, so with the doc_ids the
    cache will hold, and split by the rule `mdkd train` uses: no teacher sees the students' test documents."""
    source = CorpusSource.model_validate({"language": language, "path": str(folder / f"{language}.txt")})
    training, held = [], []
    for document in read_language([source]):
        (held if held_out(document.doc_id, fraction) else training).append(document.text)
    return training, held


def build_teachers(root: Path, languages: list[str], settings: DemoSettings) -> dict[str, dict]:
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
    # Bars follow mdkd's one rule (rank 0, on a terminal): off one, each frame would be a line of the log.
    bar = dict(desc=f"  teacher {name}", unit="step", disable=not Ranks.from_env().progress_enabled())
    with tqdm(total=steps, **bar) as progress:
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
        "windows": steps * settings.batch_size,
        "seconds": round(seconds, 1),
        "text_bytes": {
            language: sum(len(t.encode()) + 1 for t in training) for language, (training, _) in splits.items()
        },
        "loss_first_last": [losses[0], sum(losses[-20:]) / len(losses[-20:])],
        "held_out": held,
    }
    write_json_atomic(scratch / PRETRAINING, record)
    scratch.rename(root / "teachers" / name)  # a teacher exists only once it is whole
