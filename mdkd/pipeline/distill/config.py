"""Strict, typed configuration for `mdkd train` (same rules as the cache config: every problem at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mdkd.pipeline.config import ConfigError, StrictModel, format_validation_error, read_yaml
from mdkd.pipeline.files import content_hash

PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


class InheritConfig(StrictModel):
    """A student that starts from one cached teacher's weights (its "body") through the merged vocabulary."""

    teacher: str = Field(
        description="The cached teacher whose architecture, configuration and weights the student takes. Stage two "
        "loads it from where the cache's manifest says stage one found it, and refuses it when its weights are not "
        "the ones stage one cached ([training.md](training.md#inheriting-a-teachers-weights))."
    )
    layers: list[int] | None = Field(
        None,
        description="Which of the body's layers to keep, in order (e.g. `[0, 2, 4, 6, 8, 10]`, DistilBERT's every "
        "other layer). Null keeps them all.",
    )

    @model_validator(mode="after")
    def _increasing_layers(self) -> InheritConfig:
        layers = self.layers
        if layers is not None and (
            not layers or min(layers) < 0 or any(a >= b for a, b in zip(layers, layers[1:], strict=False))
        ):
            raise ValueError("init.layers must name at least one layer, in increasing order, each from 0 up")
        return self


# With `init`, the body decides these: a key given explicitly is refused unless it agrees with the body.
BODY_DECIDES = ("architecture", "preset", "hidden_size", "num_layers", "num_heads", "intermediate_size", "dropout")


class StudentConfig(StrictModel):
    """A student initialised from scratch (an architecture, and a preset or explicit sizes, which override the
    preset), or from a teacher's weights (`init`)."""

    architecture: Literal["bert", "modernbert"] = Field(
        "bert",
        description="`bert`: BERT (post-norm, learnt positions), as in MergeDistill. `modernbert`: ModernBERT "
        "(pre-norm, rotary positions, gated MLP), which leaves the frequent-token plateau far sooner at small "
        "sizes and budgets ([training.md](training.md#the-student)). Both export as an ordinary HF folder.",
    )
    preset: Literal["tiny", "small", "base"] | None = Field(
        "tiny", description="Starting sizes (table below). Null: no preset, so give all four sizes."
    )
    hidden_size: int | None = Field(
        None, ge=8, description="Hidden size; it must be divisible by the number of heads. Null: the preset's."
    )
    num_layers: int | None = Field(None, ge=1, description="Transformer layers. Null: the preset's.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads. Null: the preset's.")
    intermediate_size: int | None = Field(None, ge=8, description="Feed-forward size. Null: the preset's.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Hidden and attention dropout.")
    init: InheritConfig | None = Field(
        None,
        description="Start from a cached teacher's weights instead of random ones: `{teacher: NAME, layers: [...]}`. "
        "The student then has that teacher's architecture, sizes, dropout and configuration; `architecture`, "
        "`preset` and the size keys may be left out, and any given must agree with the body. Null: from scratch.",
    )

    def explicit_body_keys(self) -> dict:
        """With `init`: the keys among BODY_DECIDES this config gives, which must agree with the body. A key at its
        default counts as not given: a run's resolved config.yaml writes every default, and must validate again."""
        fields = type(self).model_fields
        return {
            key: getattr(self, key)
            for key in BODY_DECIDES
            if key in self.model_fields_set and getattr(self, key) != fields[key].default
        }

    def sizes(self) -> dict[str, int]:
        sizes = dict(PRESETS[self.preset]) if self.preset else {}
        dumped = self.model_dump(exclude={"architecture", "preset", "dropout"})
        sizes.update({k: v for k, v in dumped.items() if v is not None})
        return sizes

    @model_validator(mode="after")
    def _complete_and_divisible(self) -> StudentConfig:
        if self.init is not None:
            layers, explicit = self.init.layers, self.explicit_body_keys()
            if layers is not None and "num_layers" in explicit and explicit["num_layers"] != len(layers):
                raise ValueError(f"num_layers {explicit['num_layers']} is not the {len(layers)} init.layers keep")
            return self
        sizes = self.sizes()
        missing = [k for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if k not in sizes]
        if missing:
            raise ValueError(f"without a preset, give {', '.join(missing)}")
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise ValueError(f"hidden_size {sizes['hidden_size']} is not divisible by num_heads {sizes['num_heads']}")
        return self


class VocabConfig(StrictModel):
    max_size: int | None = Field(
        None,
        ge=6,
        description="Cap on the merged vocabulary, the 5 special tokens included. Null keeps every teacher token. "
        "With a cap, the most frequent tokens of the cached inputs are kept and the others are dropped "
        "([vocabulary.md](vocabulary.md#the-size-cap)). A cap at or above the union's size drops nothing.",
    )


class AlphaConfig(StrictModel):
    """Weight of the KD loss: loss = (1 - alpha_t) * MLM + alpha_t * KD.

    constant: alpha_t = start. linear (Knowledge Inheritance): alpha_t = start * max(1 - t / steps, 0).
    step: alpha_t = start until `steps`, then 0 (KD only, then MLM only). `steps` defaults to train.steps.
    """

    schedule: Literal["constant", "linear", "step"] = Field("linear", description="How α_t changes (table below).")
    start: float = Field(1.0, ge=0.0, le=1.0, description="α at step 0.")
    steps: int | None = Field(None, ge=1, description="The schedule's horizon S. Null: `train.steps`.")


class LossConfig(StrictModel):
    temperature: float = Field(2.0, gt=0.0, description="τ of the KD loss.")
    top_k: int = Field(
        8,
        ge=1,
        description="k': how many of each position's cached predictions (the most probable ones) make the soft "
        "target. At most the cached `top_k` (checked at start).",
    )
    alpha: AlphaConfig = Field(
        AlphaConfig(), description="Weight of KD against MLM over training (default: linear from 1)."
    )
    missing_mass: Literal["support", "rest", "renormalize"] = Field(
        "support",
        description="The teacher's probability outside the k' kept tokens. `support`: the KL runs over the kept "
        "tokens, one bucket for the rest of the teacher's own vocabulary, and everything else in the student "
        "vocabulary with teacher mass exactly 0 (tokens only other teachers have), with both sides' exact tempered "
        "masses (the teacher's from the cached log-partition at `temperature`, which the cache must have "
        "recorded). `rest`: one bucket for everything outside the kept tokens, so the student may put the "
        "teacher's rest on tokens that teacher cannot emit. `renormalize`: the kept tokens are rescaled to sum to "
        "one, so the student learns that everything else has probability 0 (Knowledge Inheritance's top-K recipe; "
        "the only mode a schema-1 cache supports).",
    )
    tail: Literal["auto", "sampled", "none"] = Field(
        "auto",
        description="The inside of the rest bucket. `sampled`: the cache's tail draws (cache config `tail_samples`) "
        "add an unbiased estimate of it, so the loss estimates the dense KD loss over the whole vocabulary; needs "
        "`missing_mass: support` and `top_k` equal to the cached one (the draws were made outside all of it). "
        "`none`: the rest is one bucket whose inside is free. `auto`: `sampled` when the cache has draws, "
        "`missing_mass` is `support` and `top_k` is the cached one; else `none`.",
    )
    logits_per_chunk: int = Field(
        2**24,
        ge=1,
        description="How many student logits (masked positions × vocabulary) the loss holds at once. The "
        "vocabulary projection and both losses run over chunks of max(1, logits_per_chunk // V) masked positions, "
        "and each chunk's gradient is taken while its logits exist, so the loss's memory is a few fp32 [chunk × V] "
        "blocks (about 64 MiB each at the default) instead of a few [positions × V] tensors. It changes no value "
        "beyond float rounding. Larger chunks feed a GPU's matrix products better "
        "([performance.md](performance.md#stage-two-train)).",
    )


class TrainLoopConfig(StrictModel):
    steps: int = Field(
        ge=1,
        description="Optimiser steps. Required: a run's length is a choice, so an empty config is not a valid run.",
    )
    micro_batch_size: int = Field(32, ge=1, description="Cached rows (windows) per micro-batch per rank.")
    gradient_accumulation: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimiser step. A step uses `micro_batch_size × gradient_accumulation × "
        "ranks` rows.",
    )
    lr: float = Field(5.0e-4, gt=0.0, description="Peak learning rate.")
    warmup: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of `steps` spent warming up ([schedule below](#generated-deepspeed-config)).",
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    gradient_clipping: float = Field(
        1.0, ge=0.0, description="Gradient-norm clipping (DeepSpeed's `gradient_clipping`; 0 turns it off)."
    )
    seed: int = Field(0, ge=0, description="Seeds the student's initial weights, the data order and dropout.")
    checkpoint_every: int = Field(
        500, ge=1, description="Save a checkpoint every this many steps; the last step is always saved."
    )
    eval_fraction: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="Share of documents held out of training, by a hash of `doc_id` "
        "([training.md](training.md#data-order)). 0 holds out nothing.",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Score the held-out rows every this many steps, and at the last step. Null: every "
        "`checkpoint_every` steps.",
    )
    eval_rows: int = Field(
        256,
        ge=1,
        description="Held-out rows per (teacher, language) scored at each evaluation: the first ones in cache "
        "order, the same for the whole run.",
    )


class TrackersConfig(StrictModel):
    """Experiment trackers that receive every figure of metrics.jsonl as it is logged (metrics.jsonl stays the
    source of truth), through DeepSpeed's monitors."""

    report_to: list[Literal["tensorboard", "wandb", "csv", "comet"]] = Field(
        [],
        description="Which trackers to send the run's figures to, from rank 0. `tensorboard` and `wandb` need "
        "`pip install 'mdkd[trackers]'`, `comet` needs `comet_ml` (checked at start). Empty: none.",
    )
    dir: str | None = Field(
        None,
        description="Where TensorBoard event files (`tensorboard/NAME/`), CSV files (`csv/NAME/`) and W&B's "
        "offline and run files (`wandb/`) go; a relative path is taken from the run folder. Null: `RUN/trackers`.",
    )
    name: str | None = Field(
        None,
        description="The run's name in the trackers (its TensorBoard and CSV subfolder, its W&B run name, its Comet "
        "experiment name). Null: the run folder's name.",
    )
    project: str = Field("mdkd", description="The W&B and Comet project.")
    group: str | None = Field(None, description="The W&B group (e.g. one per sweep). Null: none.")
    entity: str | None = Field(None, description="The W&B team or the Comet workspace. Null: the account's default.")

    @model_validator(mode="after")
    def _each_once(self) -> TrackersConfig:
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError("name each tracker in report_to once")
        return self


TeacherChoice = str | list[str] | dict[str, float]


class TrainConfig(StrictModel):
    """The whole `mdkd train` config."""

    teachers: dict[str, TeacherChoice] | None = Field(
        None,
        description="Which cached teachers teach which language: language → a [teacher choice]"
        "(#teachers-language--teachers). Null: every language in the cache, each from every teacher that cached "
        "it, with equal weights. A mapping limits training to the languages it names; each must be in the cache, "
        "and each of its teachers one that cached it (checked at start).",
    )
    language_sampling: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="The exponent `a` of language sampling: a training example is from language `l` with "
        "probability `p(l) = n_l^a / Σ_m n_m^a`, where `n_l` is the number of documents of `l` in the cache's "
        "manifest (held-out documents included). `a = 1` samples by corpus size, `a = 0` uniformly; 0.7 (as "
        "mBERT) favours small languages.",
    )
    student: StudentConfig = Field(StudentConfig(), description="The student's size (default: the `tiny` preset).")
    vocab: VocabConfig = Field(VocabConfig(), description="The merged vocabulary (default: no size cap).")
    loss: LossConfig = Field(LossConfig(), description="Temperature, k', the α schedule, the missing mass.")
    train: TrainLoopConfig = Field(description="Steps (required), batch, optimiser, checkpoints, held-out share.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision. `auto` is bf16 on a CUDA device that supports it, fp32 otherwise. bf16 "
        "and fp16 turn on DeepSpeed's `bf16` or `fp16` mode (fp16 with DeepSpeed's default dynamic loss "
        "scaling). The losses are always computed in fp32.",
    )
    zero_stage: int = Field(
        0,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage: 1 partitions optimiser states over ranks, 2 also gradients, 3 also "
        "parameters (gathered again for the export).",
    )
    deepspeed: dict[str, Any] = Field(
        {}, description="Raw DeepSpeed config, deep-merged over the [generated one](#generated-deepspeed-config)."
    )
    trackers: TrackersConfig = Field(
        TrackersConfig(),
        description="Experiment trackers watching the run (default: none). Not part of the run's identity: adding "
        "one to a resumed run keeps its config hash.",
    )

    @model_validator(mode="after")
    def _teacher_weights(self) -> TrainConfig:
        for language, choice in (self.teachers or {}).items():
            if isinstance(choice, list) and not choice:
                raise ValueError(f"teachers.{language}: name at least one teacher")
            if isinstance(choice, dict) and (not choice or any(w <= 0 for w in choice.values())):
                raise ValueError(f"teachers.{language}: teacher weights must be positive")
        return self

    def content_hash(self) -> str:
        # Where figures are watched changes no figure: a tracker may be added or dropped when resuming.
        return content_hash(self.model_dump(mode="json", exclude={"trackers"}))


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
