"""The demo's mdkd configs: one stage-one config for every teacher, and one stage-two config per student.

They are ordinary configs, written to the workdir's configs/ folder, so the same experiment runs at scale with hub
teachers and a real corpus in their place (docs/demo.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mdkd.demo.settings import MULTI, TOP_K, DemoSettings, mono


def cache_config(root: Path, languages: list[str], settings: DemoSettings) -> dict:
    """Stage one, once, for every teacher, on the students' slice (corpus/), not on the teachers' whole text."""
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
        # The students distil at tau = 1 (settings.TOP_K says why), so the tail is drawn there: no reweighting.
        "tail_temperature": 1.0,
        "shard_documents": 512,
    }


def train_config(choice: dict, settings: DemoSettings) -> dict:
    """A student's config: its `choice` (teachers, loss, and `init`, the teacher whose weights it starts from, if
    any) on the size, budget and schedule every student shares. An inherited student takes its sizes from its
    body, which has the same ones as a student from random weights: the teachers are all of the students' size."""
    choice = dict(choice)
    body = choice.pop("init", None)
    student = {
        "architecture": "modernbert",  # as the teachers: a post-norm BERT this small barely learns in the budget
        "preset": None,
        "hidden_size": settings.hidden,
        "num_layers": settings.layers,
        "num_heads": settings.heads,
        "intermediate_size": 4 * settings.hidden,
        "dropout": 0.0,
    }
    return {
        **choice,
        "language_sampling": 0.7,
        "student": {"init": {"teacher": body}} if body else student,
        "train": {
            "steps": settings.student_steps,
            "micro_batch_size": settings.batch_size,
            "lr": 2e-3,
            "warmup": 0.1,
            "checkpoint_every": max(1, settings.student_steps // 3),
            "eval_fraction": settings.eval_fraction,
            # Held-out curves serve Knowledge Inheritance's figure, which compares students from random weights; an
            # inherited student is scored at its last step only (`mdkd eval` gives its figures).
            "eval_every": settings.student_steps if body else settings.eval_every,
            "eval_rows": 96,
            "seed": 0,
        },
        "precision": "auto",
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
