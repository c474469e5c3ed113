"""A student that inherits a teacher's weights (its "body") through the merged vocabulary.

The student is the body's own architecture and configuration (attention pattern, norms, position handling) over
the merged vocabulary, with the body's weights, optionally only some of its layers. Only the rows indexed by the
vocabulary change (input embeddings, output rows and output biases), each made one of three ways:

- `own`: a merged token the body has takes the mean of the rows of the body ids that map to it (one id, or its
  twins);
- `pieces`: a token the body lacks takes the mean of the rows of the pieces the body's own tokenizer cuts its text
  into (fast vocabulary transfer, Gee et al. 2022), its output bias less log(1 + pieces) (the body spelt that text
  with those pieces, never with this token, so it starts below them and a one-piece copy never ties with the
  body's own token); for a continuation `##x` a leading lone word boundary is dropped and the first piece is taken
  in its continuation form where the body has one;
- `fallback`: a token whose text the body's tokenizer turns into nothing but unknown pieces (another script, a byte
  form) takes the body's mean row over its ordinary tokens, and an output bias of the body's mean bias plus the
  log of the token's smoothed frequency in the cached inputs: at most one average token's mass in all, so the
  body's own predictions barely move, and frequent tokens start ahead of rare ones.

The body is checked against the cache before anything is loaded (`body_problems`): stage two must train the
teacher stage one cached, not whatever now lies at that path.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mdkd.pipeline.cache.manifest import Manifest, TeacherEntry
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.canonical import DROPPED, ROLE_TO_SPECIAL, WORD_BOUNDARY
from mdkd.pipeline.distill.config import InheritConfig, StudentConfig
from mdkd.pipeline.distill.student_tokenizer import STUDENT_SPECIALS
from mdkd.pipeline.distill.vocab import Alignment, TeacherVocabulary, TokenTally, map_by_canonical
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.errors import UserError, first_line
from mdkd.pipeline.masked_lm import ADAPTERS
from mdkd.pipeline.weights import weights_identity

PATHS = ("own", "pieces", "fallback")
# Models whose learned positions start after the padding id: the student's padding id differs, so their position
# rows move with it.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")
_SIZE_KEYS = {  # student config key -> the transformers config attribute it names (attribute maps resolve aliases)
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}


def body_config(entry: TeacherEntry):
    """The body's transformers config, from where stage one loaded the teacher (no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(entry.model, revision=entry.revision)
    except Exception as exc:  # OSError, ValueError, hub errors: the folder or hub id is no longer there
        raise UserError(
            f"student.init: cannot load the config of teacher at {entry.model}: {first_line(exc)}"
        ) from None


def body_problems(settings: StudentConfig, manifest: Manifest) -> list[str]:
    """Every way `student.init` does not fit the cache and the body found at the manifest's path: the name, the
    architecture, the weights (against what stage one cached), the layers and any explicit size key."""
    init = settings.init
    if init is None:
        return []
    if init.teacher not in manifest.teachers:
        return [f"student.init.teacher '{init.teacher}' is not in the cache (cached: {', '.join(manifest.teachers)})"]
    entry = manifest.teachers[init.teacher]
    where = f"student.init.teacher '{init.teacher}'"
    if entry.model_type not in ADAPTERS:
        return [f"{where} is a '{entry.model_type}' model, which mdkd cannot build a student from"]
    try:
        config = body_config(entry)
    except UserError as error:
        return [str(error)]
    found = weights_identity(entry.model, entry.revision, config)
    if found != entry.weights:
        return [
            f"{where}: the weights at {entry.model} are not the ones stage one cached (cached {entry.weights}, found "
            f"{found}); restore them, or rebuild the cache with these"
        ]
    problems = []
    depth = config.num_hidden_layers
    if init.layers is not None:
        if max(init.layers) >= depth:
            problems.append(
                f"student.init.layers names layer {max(init.layers)}, but the body has {depth} (0-{depth - 1})"
            )
        if entry.model_type == "albert" and init.layers != list(range(depth)):
            problems.append("student.init.layers: ALBERT shares one layer's weights across its depth; keep them all")
    body_sizes = {key: getattr(config, attribute, None) for key, attribute in _SIZE_KEYS.items()}
    if init.layers is not None:
        body_sizes["num_layers"] = len(init.layers)
    contradictions = []
    for key, value in settings.explicit_body_keys().items():
        if key in body_sizes and value != body_sizes[key]:
            contradictions.append(f"{key} {value} (the body's is {body_sizes[key]})")
        elif key == "architecture" and value != entry.model_type:
            contradictions.append(f"architecture {value} (the body is {entry.model_type})")
        elif key in ("preset", "dropout"):
            contradictions.append(f"{key} {value} (the body's configuration decides it)")
    if contradictions:
        problems.append(f"student: with init the body decides the sizes; drop {', '.join(contradictions)}")
    return problems


@dataclass
class Inheritance:
    """The student built from the body, and how each of its vocabulary rows was made."""

    model: nn.Module
    paths: np.ndarray  # [student vocabulary] index into PATHS
    layers: list[int]

    def stats(self, body: str) -> dict:
        counts = np.bincount(self.paths, minlength=len(PATHS))
        return {
            "body": body,
            "layers": self.layers,
            "rows": {path: int(n) for path, n in zip(PATHS, counts, strict=True)},
        }


def inherit_student(init: InheritConfig, cache: CacheReader, alignment: Alignment, shards, seed: int) -> Inheritance:
    """The body's weights (checked against the cache first) carried into a student over `alignment`'s vocabulary.
    `shards` are the run's, which give the fallback rows' token frequencies."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    entry = cache.teacher(init.teacher)
    problems = body_problems(StudentConfig(init=init), cache.manifest)
    if problems:
        raise UserError("; ".join(problems))
    try:
        with transformers_console(Ranks.from_env()):
            body = AutoModelForMaskedLM.from_pretrained(entry.model, revision=entry.revision, dtype=torch.float32)
    except Exception as exc:
        raise UserError(
            f"student.init: cannot load teacher {init.teacher} from {entry.model}: {first_line(exc)}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(str(cache.tokenizer_file(init.teacher).parent))
    vocabulary = TeacherVocabulary.from_cache(cache, init.teacher)
    sources, paths = row_sources(alignment, init.teacher, vocabulary, tokenizer)
    log_frequency = None
    if (paths == PATHS.index("fallback")).any():
        log_frequency = _log_frequencies(cache, alignment, shards)
    layers = init.layers if init.layers is not None else list(range(body.config.num_hidden_layers))
    config = _student_config(body.config, len(alignment.tokens), layers)
    torch.manual_seed(seed)
    student = AutoModelForMaskedLM.from_config(config)
    state = _student_state(body, entry, sources, paths, log_frequency, layers, vocabulary)
    student.load_state_dict(state, strict=True)
    return Inheritance(student, paths, layers)


def row_sources(
    alignment: Alignment, body: str, vocabulary: TeacherVocabulary, tokenizer
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per student token, the body ids whose rows it averages (empty: the fallback), and which path made it."""
    id_map = body_id_map(alignment, body, vocabulary)
    own: list[list[int]] = [[] for _ in alignment.tokens]
    for body_id, student_id in enumerate(id_map):
        if student_id != DROPPED:
            own[student_id].append(body_id)
    body_id_of = {}
    for body_id, token in enumerate(vocabulary.canonical):
        body_id_of.setdefault(token, body_id)
    missing = [index for index, ids in enumerate(own) if not ids]
    texts = [_text_of(alignment.tokens[index]) for index in missing]
    pieces = tokenizer([text or "" for text in texts], add_special_tokens=False)["input_ids"]
    unknown = {tokenizer.unk_token_id, *tokenizer.all_special_ids}
    sources, paths = [np.array(ids, dtype=np.int64) for ids in own], np.zeros(len(own), dtype=np.int64)
    for index, text, ids in zip(missing, texts, pieces, strict=True):
        token = alignment.tokens[index]
        ids = [i for i in ids if i not in unknown] if text else []
        if token.startswith("##") and ids:
            ids = _as_continuation(ids, vocabulary.canonical, body_id_of)
        sources[index] = np.array(ids, dtype=np.int64)
        paths[index] = PATHS.index("pieces" if ids else "fallback")
    return sources, paths


def body_id_map(alignment: Alignment, body: str, vocabulary: TeacherVocabulary) -> np.ndarray:
    """body id -> student id. A body that is one of the run's teachers has its id map in the alignment; one that is
    not (a multilingual body under monolingual teachers) maps by canonical token, and its tokens that no teacher of
    the run has get no row (-1), as a vocabulary cap's dropped ids."""
    if body in alignment.id_maps:
        return alignment.id_maps[body]
    return map_by_canonical(vocabulary, alignment.tokens)


def _text_of(token: str) -> str | None:
    """The text a canonical token spells (None: a special, a word boundary or a byte form, which have none)."""
    if token in STUDENT_SPECIALS or token == WORD_BOUNDARY or re.fullmatch(r"(##)?(<0x[0-9A-F]{2}>)+", token):
        return None
    return token.removeprefix("##")


def _as_continuation(ids: list[int], canonical: list[str], body_id_of: dict[str, int]) -> list[int]:
    """A continuation's pieces: the body cut its text as a word of its own, so a leading lone word boundary goes
    and the first piece becomes the body's continuation form of it, where the body has one."""
    if canonical[ids[0]] == WORD_BOUNDARY and len(ids) > 1:
        ids = ids[1:]
    first = canonical[ids[0]]
    if not first.startswith("##") and "##" + first in body_id_of:
        ids = [body_id_of["##" + first], *ids[1:]]
    return ids


def _log_frequencies(cache: CacheReader, alignment: Alignment, shards) -> np.ndarray:
    """log of each student token's add-one-smoothed share of the cached (unmasked) inputs of the run's shards."""
    counts = np.zeros(len(alignment.tokens))
    for teacher in alignment.id_maps:
        own = [shard for shard in shards if shard.teacher == teacher]
        if not own:
            continue
        tally = TokenTally.from_cache(cache, own, len(alignment.id_maps[teacher]))
        kept = alignment.id_maps[teacher] != DROPPED
        np.add.at(counts, alignment.id_maps[teacher][kept], tally.inputs[kept])
    return np.log((counts + 1) / (counts.sum() + len(counts)))


def _student_config(body_config, vocab_size: int, layers: list[int]):
    """The body's config over the merged vocabulary: its special roles pointed at the student's specials, and only
    the kept layers (ModernBERT's per-layer attention pattern kept with them)."""
    config = copy.deepcopy(body_config)
    config.vocab_size = vocab_size
    for role, special in ROLE_TO_SPECIAL.items():
        if getattr(config, f"{role}_token_id", None) is not None:
            setattr(config, f"{role}_token_id", STUDENT_SPECIALS.index(special))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return config


def _student_state(
    body: nn.Module,
    entry: TeacherEntry,
    sources: list[np.ndarray],
    paths: np.ndarray,
    log_frequency: np.ndarray | None,
    layers: list[int],
    vocabulary: TeacherVocabulary,
) -> dict[str, torch.Tensor]:
    """The body's state dict with its vocabulary rows rebuilt, its kept layers renumbered and (where positions start
    after the padding id) its position rows moved to the student's padding id."""
    state = body.state_dict()
    vocab_names = _vocabulary_tensors(body, state)
    stack = _layer_stack(body)
    ordinary = np.array(
        [i for i, token in enumerate(vocabulary.canonical) if token not in STUDENT_SPECIALS], dtype=np.int64
    )
    rows, weights = _averaging(sources)
    fallback = torch.from_numpy(np.flatnonzero(paths == PATHS.index("fallback")))
    pieced = np.flatnonzero(paths == PATHS.index("pieces"))
    piece_counts = np.array([len(sources[i]) for i in pieced], dtype=np.float64)
    pieced = torch.from_numpy(pieced)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in vocab_names:
            new = torch.zeros((len(sources), *tensor.shape[1:]), dtype=tensor.dtype)
            ids = torch.from_numpy(np.concatenate(sources)) if rows.numel() else torch.zeros(0, dtype=torch.long)
            new.index_add_(0, rows, tensor[ids] * weights.view(-1, *[1] * (tensor.dim() - 1)).to(tensor.dtype))
            if len(fallback):
                new[fallback] = tensor[torch.from_numpy(ordinary)].mean(0)
                if tensor.dim() == 1 and log_frequency is not None:
                    new[fallback] += torch.from_numpy(log_frequency[fallback.numpy()]).to(tensor.dtype)
            if tensor.dim() == 1 and len(pieced):
                # The body spelt this text with its pieces, never with this token: it starts below them
                # (log(1 + pieces) under their mean bias), so a one-piece copy does not tie with the body's own token.
                new[pieced] -= torch.from_numpy(np.log1p(piece_counts)).to(tensor.dtype)
            out[name] = new
        elif stack is not None and name.startswith(stack + "."):
            index, rest = name[len(stack) + 1 :].split(".", 1)
            if int(index) in layers:
                out[f"{stack}.{layers.index(int(index))}.{rest}"] = tensor
        elif entry.model_type in _POSITIONS_AFTER_PADDING and name.endswith("position_embeddings.weight"):
            out[name] = _positions_after(tensor, body.config.pad_token_id, STUDENT_SPECIALS.index("[PAD]"))
        else:
            out[name] = tensor
    return out


def _averaging(sources: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(student row, weight) for every source id in order: each token's ids share its row with weight 1/count."""
    lengths = np.array([len(ids) for ids in sources])
    rows = np.repeat(np.arange(len(sources)), lengths)
    weights = np.repeat(1.0 / np.maximum(lengths, 1), lengths)
    return torch.from_numpy(rows), torch.from_numpy(weights)


def _vocabulary_tensors(body: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """The state-dict entries indexed by the body's vocabulary: its input embeddings, its output rows (tied or not)
    and its output biases."""
    size = body.config.vocab_size
    matrices = {body.get_input_embeddings().weight.data_ptr()}
    output = body.get_output_embeddings()
    if output is not None and output.weight.shape[0] == size:
        matrices.add(output.weight.data_ptr())
    names = {
        name
        for name, tensor in state.items()
        if tensor.shape[:1] == (size,) and (tensor.dim() == 1 or tensor.data_ptr() in matrices)
    }
    unknown = [n for n, t in state.items() if t.dim() == 2 and t.shape[0] == size and n not in names]
    if unknown:
        raise UserError(f"student.init: cannot tell how {', '.join(unknown)} depends on the body's vocabulary")
    return names


def _layer_stack(body: nn.Module) -> str | None:
    """The state-dict prefix of the body's list of layers (`bert.encoder.layer`, `model.layers`, ...); None when its
    layers share one set of weights (ALBERT)."""
    depth = body.config.num_hidden_layers
    stacks = [
        name for name, module in body.named_modules() if isinstance(module, nn.ModuleList) and len(module) == depth
    ]
    return stacks[0] if len(stacks) == 1 else None


def _positions_after(table: torch.Tensor, body_pad: int, student_pad: int) -> torch.Tensor:
    """Position rows for a model whose first position id is its padding id + 1: row student_pad + 1 + i of the
    student is row body_pad + 1 + i of the body (the padding row moves too; rows past the body's end repeat its
    last row, so the student takes at least the positions the body takes)."""
    shift = body_pad - student_pad
    source = (torch.arange(len(table)) + shift).clamp(0, len(table) - 1)
    return table[source]


def longest_input(config) -> int:
    """The most ids one input of the student may hold (its tokenizer's `model_max_length`)."""
    after_padding = config.pad_token_id + 1 if config.model_type in _POSITIONS_AFTER_PADDING else 0
    return config.max_position_embeddings - after_padding


def model_input_names(model: nn.Module) -> list[str]:
    """What the exported tokenizer should return for this model: token type ids only where its forward takes them."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in accepted]
