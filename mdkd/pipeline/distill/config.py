"""Strict, typed configuration for `mdkd train` (same rules as the cache config: every problem at once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mdkd.pipeline.config import ConfigError, StrictModel, format_validation_error, read_yaml

PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


class StudentConfig(StrictModel):
    """A BERT-style student initialised from scratch: a preset, or explicit sizes (which override the preset)."""

    preset: Literal["tiny", "small", "base"] | None = "tiny"
    hidden_size: int | None = Field(None, ge=8)
    num_layers: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def sizes(self) -> dict[str, int]:
        sizes = dict(PRESETS[self.preset]) if self.preset else {}
        sizes.update({k: v for k, v in self.model_dump(exclude={"preset", "dropout"}).items() if v is not None})
        return sizes

    @model_validator(mode="after")
    def _complete_and_divisible(self) -> "StudentConfig":
        sizes = self.sizes()
        missing = [k for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if k not in sizes]
        if missing:
            raise ValueError(f"without a preset, give {', '.join(missing)}")
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise ValueError(f"hidden_size {sizes['hidden_size']} is not divisible by num_heads {sizes['num_heads']}")
        return self


class VocabConfig(StrictModel):
    max_size: int | None = Field(None, ge=6)


class AlphaConfig(StrictModel):
    """Weight of the KD loss: loss = (1 - alpha_t) * MLM + alpha_t * KD.

    constant: alpha_t = start. linear (Knowledge Inheritance): alpha_t = start * max(1 - t / steps, 0).
    step: alpha_t = start until `steps`, then 0 (KD only, then MLM only). `steps` defaults to train.steps.
    """

    schedule: Literal["constant", "linear", "step"] = "linear"
    start: float = Field(1.0, ge=0.0, le=1.0)
    steps: int | None = Field(None, ge=1)


class LossConfig(StrictModel):
    temperature: float = Field(2.0, gt=0.0)
    top_k: int = Field(8, ge=1)
    alpha: AlphaConfig = AlphaConfig()
    missing_mass: Literal["renormalize", "rest"] = "renormalize"


class TrainLoopConfig(StrictModel):
    steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    lr: float = Field(5.0e-4, gt=0.0)
    warmup: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    gradient_clipping: float = Field(1.0, ge=0.0)
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)
    eval_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    eval_every: int | None = Field(None, ge=1)  # default: at every checkpoint
    eval_rows: int = Field(256, ge=1)  # held-out rows per (teacher, language) scored at each evaluation


TeacherChoice = str | list[str] | dict[str, float]


class TrainConfig(StrictModel):
    """The whole `mdkd train` config."""

    teachers: dict[str, TeacherChoice] | None = None
    language_sampling: float = Field(0.7, ge=0.0, le=1.0)
    student: StudentConfig = StudentConfig()
    vocab: VocabConfig = VocabConfig()
    loss: LossConfig = LossConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    zero_stage: int = Field(0, ge=0, le=3)
    deepspeed: dict[str, Any] = {}

    @model_validator(mode="after")
    def _teacher_weights(self) -> "TrainConfig":
        for language, choice in (self.teachers or {}).items():
            if isinstance(choice, list) and not choice:
                raise ValueError(f"teachers.{language}: name at least one teacher")
            if isinstance(choice, dict) and (not choice or any(w <= 0 for w in choice.values())):
                raise ValueError(f"teachers.{language}: teacher weights must be positive")
        return self

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def teacher_weights(choice: TeacherChoice) -> dict[str, float]:
    """A language's teachers as {name: weight}: one name, a list (equal weights) or a mapping of weights."""
    if isinstance(choice, str):
        return {choice: 1.0}
    if isinstance(choice, list):
        return {name: 1.0 for name in choice}
    return dict(choice)


def validate_train_config(raw: Any, path: Path) -> TrainConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the file must hold a mapping of keys (teachers, student, loss, train, ...)"])
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(path, format_validation_error(error)) from None


def load_train_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    return validate_train_config(read_yaml(path), path)
