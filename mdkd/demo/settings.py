"""The demo's cast and sizes: its languages, its teachers' names, and the two sizes it runs at (full and --quick)."""

from __future__ import annotations

from dataclasses import dataclass

LANGUAGES = ["de", "en", "ru", "zh"]
MULTI = "multi"
# A teacher this small spreads its mass thinly: its top-8 holds 24 to 46 % of it at tau = 1 and 3 to 8 % at tau = 2
# (`mdkd cache inspect`), so the students distil from the top-64 at tau = 1, which holds 42 to 72 % (docs/demo.md).
TOP_K = 64


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
