"""Strict, typed configuration for `mdkd cache-logits`.

Every problem in a config file is collected and reported at once, before any model is loaded: unknown keys,
wrong types, out-of-range values, missing files, teacher paths that do not exist, and languages that no teacher
serves. Relative paths are resolved against the folder that holds the config file, so a config and its data can
be moved together. The resolved config (absolute paths, every default filled in) is what gets saved beside
outputs and hashed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from mdkd.pipeline.config import ConfigError, StrictModel, format_validation_error, read_yaml
from mdkd.pipeline.files import content_hash
from mdkd.pipeline.store import ObjectFolder, is_uri

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def resolve_local_or_hub(value: str, base_dir: Path) -> tuple[str, bool]:
    """Return (resolved value, is_local) for a model or tokenizer reference.

    A reference that exists relative to `base_dir` (or absolutely) is a local folder. One that looks like a hub id
    (`name` or `org/name`) is kept as is for `from_pretrained`. Anything else is a local path that does not exist.
    """
    candidate = (base_dir / Path(value).expanduser()).resolve()
    if candidate.exists():
        return str(candidate), True
    if _HUB_ID.match(value) and not value.startswith("."):
        return value, False
    raise ValueError(f"folder not found: {candidate} (give an existing local folder or a hub id like org/name)")


class CorpusSource(StrictModel):
    """One source of documents for one language: a local file or folder, or a `datasets` spec."""

    language: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The language code: it is the shard folder name and the `doc_id` prefix.",
    )
    path: str | None = Field(
        None,
        description="A `.txt`, `.jsonl` or `.parquet` file, or a folder. A folder contributes every file with one of "
        "those suffixes at any depth, sorted by relative path. Must exist. It may be a URI of an fsspec filesystem "
        "instead (`s3://bucket/de.txt`, or a prefix `s3://bucket/corpus/` as a folder), read from the store as it "
        "is streamed ([running.md](running.md#writing-the-cache-to-a-bucket)).",
    )
    dataset: dict[str, Any] | None = Field(
        None,
        description="Keyword arguments for `datasets.load_dataset`. It must contain `path`: a hub dataset name, or a "
        "local folder (resolved like `path`, see [below](#paths-relative-to-the-config-file)). It must come down to "
        "one split, so give `split`. Other keys (`name`, `data_files`, `revision`, `streaming`, ...) are passed "
        "through as given.",
    )
    text_field: str = Field(
        "text",
        description="The JSON key, Parquet column or dataset column that holds the text. It is ignored for `.txt` "
        "files.",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if is_uri(value):
            return _object_source(value)
        resolved = (_base_dir(info) / Path(value).expanduser()).resolve()
        if not resolved.exists():
            raise ValueError(f"corpus file not found: {resolved}")
        if resolved.is_file() and resolved.suffix not in CORPUS_SUFFIXES:
            raise ValueError(f"unsupported corpus file {resolved.name}: use one of {', '.join(CORPUS_SUFFIXES)}")
        return str(resolved)

    @field_validator("dataset")
    @classmethod
    def _dataset_has_path(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value.get("path"), str):
            raise ValueError(
                "a dataset spec needs a 'path' (a hub name or a local folder), as for datasets.load_dataset"
            )
        local = (_base_dir(info) / Path(value["path"]).expanduser()).resolve()
        return {**value, "path": str(local)} if local.exists() else value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> CorpusSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' or 'dataset'")
        return self

    @property
    def description(self) -> str:
        if self.path is not None:
            return self.path
        return "dataset:" + json.dumps(self.dataset, sort_keys=True)

    def files(self) -> list[tuple[Path | str, str]]:
        """(file, its name in doc_ids) for a `path` source, in a stable order: a file is named by its base name, a
        folder's files by their paths relative to it. A file on a store is its URI; its name and its place in the
        order are those the same file would have on a local disk (paths are compared part by part)."""
        if is_uri(self.path):
            folder = ObjectFolder(self.path)
            if folder.kind() == "file":
                return [(folder.uri, PurePosixPath(folder.uri).name)]
            found = [name for name in folder.find("") if PurePosixPath(name).suffix in CORPUS_SUFFIXES]
            return [(folder.name(name), name) for name in sorted(found, key=lambda name: PurePosixPath(name).parts)]
        root = Path(self.path)
        if root.is_file():
            return [(root, root.name)]
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        return [(p, p.relative_to(root).as_posix()) for p in files]

    def dataset_name(self) -> str:
        """What a `dataset` source's doc_ids start with: its path, name and split."""
        return ":".join(str(self.dataset[k]) for k in ("path", "name", "split") if self.dataset.get(k))

    def document_names(self) -> list[str]:
        """The names this source gives its documents' files in doc_ids (`<language>:<name>:<line or row>`)."""
        return [name for _, name in self.files()] if self.path is not None else [self.dataset_name()]


def _object_source(uri: str) -> str:
    """A corpus URI that names an object or a prefix holding objects (the store is asked now, so a missing one is
    found before any work); failing to reach the store is a one-line UserError of its own."""
    kind = ObjectFolder(uri).kind()
    if kind is None:
        raise ValueError(f"corpus object not found: {uri} (check the URI: an object, or a prefix holding objects)")
    if kind == "file" and PurePosixPath(uri).suffix not in CORPUS_SUFFIXES:
        raise ValueError(f"unsupported corpus file {PurePosixPath(uri).name}: use one of {', '.join(CORPUS_SUFFIXES)}")
    return uri.rstrip("/")


class TeacherSpec(StrictModel):
    """A teacher masked LM, its tokenizer (default: the model's own) and the languages it serves."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Unique among the teachers. It names the teacher's shard folder and its tokenizer copy.",
    )
    model: str = Field(
        description="A local folder or a hub id (see [the rule below](#local-folder-or-hub-id)). The model must be a "
        "masked LM (a `*ForMaskedLM` type in transformers). A local folder must hold weight files."
    )
    tokenizer: str | None = Field(
        None,
        description="A local folder or a hub id, same rule as `model`; null means the model's own. It must be a fast "
        "(Rust) tokenizer with a mask token and no more tokens than the model's vocabulary.",
    )
    revision: str | None = Field(
        None,
        description="A hub revision (branch, tag or commit). It is used for the model's config and weights, and for "
        "the tokenizer when `tokenizer` is not given. A separate `tokenizer` is always loaded at its default revision.",
    )
    languages: list[str] = Field(
        min_length=1,
        description="The corpus languages this teacher runs on, each matching `^[A-Za-z0-9][A-Za-z0-9_.-]*$`. Each "
        "must have a corpus source.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code the checkpoint ships for its config, tokenizer and model. Off by default: "
        "turn it on only for a model you trust, whose architecture transformers does not include.",
    )

    @field_validator("languages")
    @classmethod
    def _language_names(cls, value: list[str]) -> list[str]:
        bad = [language for language in value if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", language)]
        if bad:
            raise ValueError(f"language names are folder names: letters, digits, '_', '.', '-' (got {bad})")
        twice = sorted({language for language in value if value.count(language) > 1})
        if twice:
            raise ValueError(f"languages {twice} are listed twice (each would be computed and trained on twice)")
        return value

    @field_validator("model", "tokenizer")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return resolve_local_or_hub(value, _base_dir(info))[0]

    @property
    def tokenizer_ref(self) -> str:
        return self.tokenizer or self.model


class MaskingConfig(StrictModel):
    """BERT-style masking: which share of tokens is predicted, and how the chosen ones are corrupted."""

    probability: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="Share of a window's ordinary tokens that are predicted. Each window gets exactly "
        "`max(1, round(n × p))` positions, chosen among its `n` non-special tokens. Special tokens are never chosen.",
    )
    mask: float = Field(0.8, ge=0.0, le=1.0, description="Share of chosen positions replaced by the mask token.")
    random: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share replaced by a random ordinary (non-special) token, which may happen to be the original.",
    )
    keep: float = Field(
        0.1, ge=0.0, le=1.0, description="Share left unchanged. `mask + random + keep` must be 1 (within 1e-6)."
    )
    seed: int = Field(
        0, description="Base seed. The random draws for a window depend only on (seed, doc_id, window, copy)."
    )
    copies: int = Field(
        1, ge=1, description="Independently masked copies of every window. Each copy is its own shard row."
    )

    @model_validator(mode="after")
    def _split_sums_to_one(self) -> MaskingConfig:
        if abs(self.mask + self.random + self.keep - 1.0) > 1e-6:
            raise ValueError(f"mask + random + keep must sum to 1 (got {self.mask + self.random + self.keep:g})")
        return self


class CacheConfig(StrictModel):
    """The whole `mdkd cache-logits` config."""

    corpus: list[CorpusSource] = Field(min_length=1, description="Where the documents come from.")
    teachers: list[TeacherSpec] = Field(min_length=1, description="The masked LMs to cache.")
    masking: MaskingConfig = Field(MaskingConfig(), description="How positions are chosen and corrupted.")
    max_length: int = Field(
        128,
        ge=8,
        description="Window length in tokens, special tokens included. A longer document is split into consecutive "
        "windows of at most this length; no text is dropped. It must not exceed any teacher's position limit "
        "(checked at `cache-logits` setup): the model's `max_position_embeddings`, less 2 for RoBERTa, XLM-R and "
        "CamemBERT (their positions start after the padding index), so 512 for BERT and XLM-R. A model without "
        "absolute positions has no limit.",
    )
    top_k: int = Field(
        8,
        ge=1,
        description="Predictions cached per masked position. It must not exceed any teacher's vocabulary (checked "
        "at `cache-logits` setup).",
    )
    temperatures: list[float] = Field(
        [1.0, 2.0],
        min_length=1,
        description="Temperatures tau at which stage two may distil. For each, every masked position stores the "
        "teacher's tempered log-partition over its whole vocabulary (4 bytes), so stage two rebuilds the exact "
        "tempered probabilities of the top-k and of everything else (`loss.missing_mass: rest`). A `loss.temperature` "
        "not listed here is refused by `mdkd train`. Each is > 0, none twice.",
    )

    tail_samples: int = Field(
        64,
        ge=0,
        le=1024,
        description="Ids drawn per masked position from the teacher's distribution outside the top-k (with "
        "replacement, at `tail_temperature`), stored as distinct ids with their counts and log-probabilities, so "
        "that stage two's loss is an unbiased estimate of the dense KD loss over the whole vocabulary "
        "([training.md](training.md#the-loss)). 0 stores none. The default is what pure KD from a weak teacher "
        "needed to give a usable student ([training.md](training.md#choosing-k-and-tau)); it costs bytes: about "
        "330 per position on that teacher, against 54 for its top-8 alone.",
    )
    tail_temperature: float = Field(
        2.0,
        gt=0,
        description="The temperature the tail is drawn at; it must be one of `temperatures`. Stage two can distil "
        "at any cached temperature from it (the draws are reweighted exactly), with the least noise at this one: "
        "draw at the `loss.temperature` you will train with (default 2).",
    )

    @field_validator("temperatures")
    @classmethod
    def _positive_and_distinct(cls, value: list[float]) -> list[float]:
        if any(tau <= 0 for tau in value) or len(set(value)) != len(value):
            raise ValueError(f"temperatures must be positive and distinct (got {value})")
        return value

    @model_validator(mode="after")
    def _tail_at_a_cached_temperature(self) -> CacheConfig:
        if self.tail_samples and self.tail_temperature not in self.temperatures:
            raise ValueError(
                f"tail_temperature {self.tail_temperature:g} must be one of temperatures {self.temperatures} "
                "(stage two needs its log-partition)"
            )
        return self

    batch_tokens: int | None = Field(
        16384,
        ge=8,
        description="Padded-token budget of a forward pass. Windows are sorted by length and grouped while "
        "(windows × longest window) stays within the budget. A single window always makes a batch.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="A fixed number of windows per forward pass. When set, it replaces `batch_tokens`. With both "
        "null, each window is its own batch.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Precision the teachers run in. `auto` means bf16 on a CUDA device that supports it, fp32 "
        "otherwise. The log-softmax is always taken in fp32. The resolved precision is part of the "
        "[cache identity](#what-identifies-a-cache).",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="Where the teachers run: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`. `auto` means this rank's GPU "
        "when CUDA is available, the CPU otherwise. A bare `cuda` also means this rank's GPU, "
        "`cuda:(LOCAL_RANK % number of GPUs)`. `cuda:N` is taken literally, so every rank uses GPU N. Under a "
        "multi-process launcher keep `auto` or `cuda` ([multi-gpu.md](multi-gpu.md#devices)).",
    )
    workers: int | None = Field(
        None,
        ge=0,
        description="Worker processes that prepare units for the teachers: they read nothing themselves but "
        "tokenise, window, mask and pad the documents the main process sends them, while it runs the teacher. "
        "null means the cores this process may use, shared among the ranks on the machine, less one for each "
        "rank's main process. 0 prepares in the main process, in a background thread. Any count writes the same "
        "bytes. About twice this many units are held in memory, prepared ahead.",
    )
    logprobs_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage type of `topk_logprobs` in the shards. `float16` halves that column."
    )
    shard_documents: int = Field(
        2048,
        ge=1,
        description="Documents per unit of work, and so per shard. It is also the unit of resuming and of splitting "
        "work between processes. A unit is held in memory whole while it runs.",
    )

    def languages(self) -> list[str]:
        """Corpus languages in first-seen order."""
        return list(dict.fromkeys(source.language for source in self.corpus))

    def sources_for(self, language: str) -> list[CorpusSource]:
        return [source for source in self.corpus if source.language == language]

    def content_hash(self) -> str:
        """Hash of every setting that changes what the cache holds, but not where files are.

        Locations are left out (the cache identity holds the corpus fingerprints and teacher hashes instead): a
        corpus path, local or a URI, counts by its base name only, so a cache can be resumed after its data moved,
        to another folder or to a bucket. `device`, `batch_tokens`, `batch_size` and `workers` are
        left out too: they are how the work runs, and a user resuming after running out of memory must be able to
        lower the batch without starting over (the results then differ from an uninterrupted run in the last
        bits); `workers` changes no bit, and leaving it out keeps the hash of caches begun before it existed.
        """
        content = self.model_dump(mode="json", exclude={"device", "batch_tokens", "batch_size", "workers"})
        for source in content["corpus"]:
            source["path"] = Path(source["path"]).name if source["path"] else None
        for teacher in content["teachers"]:
            for key in ("model", "tokenizer"):
                if teacher[key] and Path(teacher[key]).is_absolute():
                    teacher[key] = "local"
        return content_hash(content)


def _cross_checks(raw: Any) -> list[str]:
    """Checks that span sections, run on the raw YAML so they are reported even when other keys are invalid."""
    if not isinstance(raw, dict):
        return []
    corpus = raw.get("corpus") if isinstance(raw.get("corpus"), list) else []
    teachers = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
    corpus_languages = [s["language"] for s in corpus if isinstance(s, dict) and isinstance(s.get("language"), str)]
    served: set[str] = set()
    names: list[str] = []
    for teacher in teachers:
        if not isinstance(teacher, dict):
            continue
        languages = teacher.get("languages")
        if isinstance(languages, list):
            served.update(x for x in languages if isinstance(x, str))
        if isinstance(teacher.get("name"), str):
            names.append(teacher["name"])
    problems = []
    for language in dict.fromkeys(corpus_languages):
        if teachers and language not in served:
            problems.append(f"corpus: language '{language}' is served by no teacher (add it to a teacher's languages)")
    for language in sorted(served - set(corpus_languages)):
        if corpus:
            problems.append(f"teachers: language '{language}' has no corpus source (add one or remove the language)")
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"teachers: name '{name}' is used twice (teacher names must be unique)")
    return problems


def validate_cache_config(raw: Any, path: Path) -> CacheConfig:
    """Validate raw YAML data for `cache-logits`; raise ConfigError listing every problem."""
    problems: list[str] = []
    config = None
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the file must hold a mapping of keys (corpus, teachers, ...)"])
    try:
        config = CacheConfig.model_validate(raw, context={"base_dir": path.parent.resolve()})
    except ValidationError as error:
        problems.extend(format_validation_error(error))
    problems.extend(_cross_checks(raw))
    if config is not None:
        problems.extend(_document_name_clashes(config))
    if problems or config is None:
        raise ConfigError(path, problems)
    return config


def _document_name_clashes(config: CacheConfig) -> list[str]:
    """Two sources of a language that would give documents the same doc_id (the same file listed twice, or
    `a/de.txt` and `b/de.txt`, both named `de.txt`): the held-out rule and the cache could not tell them apart."""
    problems = []
    for language in config.languages():
        owners: dict[str, str] = {}
        for source in config.sources_for(language):
            for name in dict.fromkeys(source.document_names()):
                if name in owners:
                    same = owners[name] == source.description
                    problems.append(
                        f"corpus: {source.description} is listed twice for language '{language}' (remove one)"
                        if same
                        else f"corpus: {owners[name]} and {source.description} both name documents '{name}' in "
                        f"language '{language}', so their doc_ids collide (rename one file, or give their folder)"
                    )
                    break
                owners[name] = source.description
    return problems


def load_cache_config(path: str | Path) -> CacheConfig:
    path = Path(path)
    return validate_cache_config(read_yaml(path), path)
