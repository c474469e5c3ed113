"""Teacher masked LMs: checks before loading, loading, and top-k scoring at masked positions only.

A checkpoint without a trained MLM head (an encoder saved as `BertModel`, say) would load as a `*ForMaskedLM`
with a freshly initialised head and cache random predictions, so loading refuses any weight the checkpoint
lacks.

Scoring runs the encoder on the whole batch but applies the MLM head only to the hidden states at masked
positions (mdkd/pipeline/masked_lm.py), and keeps everything after the forward on the device: one packed copy per
batch comes back to the host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mdkd.pipeline.cache.manifest import special_token_ids
from mdkd.pipeline.canonical import canonical_tokens, twin_classes
from mdkd.pipeline.distributed import Ranks, transformers_console
from mdkd.pipeline.errors import UserError, first_line
from mdkd.pipeline.masked_lm import ADAPTERS, masked_logits
from mdkd.pipeline.teacher_pass.config import TeacherSpec
from mdkd.pipeline.weights import weight_files, weights_identity


@dataclass
class TeacherInfo:
    """What was learnt about a teacher before loading its weights; goes into the manifest."""

    spec: TeacherSpec
    tokenizer: object
    model_type: str
    architecture: str
    model_vocab_size: int
    weights: str  # sha256 of the local weight files, or the hub revision asked for
    classes: np.ndarray  # [vocab] each id's canonical-token class (twins share one); see `Teacher.top_k`
    representatives: np.ndarray  # [classes] each class's smallest id, which stands for it in the cache

    def manifest_entry(self, tokenizer_dir: str, tokenizer_hash: str) -> dict:
        return {
            "model": self.spec.model,
            "tokenizer_source": self.spec.tokenizer_ref,
            "revision": self.spec.revision,
            "weights": self.weights,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "vocab_size": len(self.tokenizer),
            "model_vocab_size": self.model_vocab_size,
            "special_token_ids": special_token_ids(self.tokenizer),
            "languages": list(self.spec.languages),
            "tokenizer_dir": tokenizer_dir,
            "tokenizer_hash": tokenizer_hash,
        }


# Models whose learned absolute positions start after the padding index (position ids begin at pad + 1).
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def position_limit(config) -> int | None:
    """The longest input the model can take, or None when its positions are relative (no fixed limit)."""
    if getattr(config, "position_biased_input", True) is False or not hasattr(config, "max_position_embeddings"):
        return None
    return config.max_position_embeddings - _POSITION_OFFSET.get(config.model_type, 0)


def inspect_teacher(spec: TeacherSpec, top_k: int, max_length: int) -> tuple[TeacherInfo | None, list[str]]:
    """Load a teacher's config and tokenizer (not its weights) and check they can be used; return the problems."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    where = f"teacher {spec.name}"
    for role, reference in (("model", spec.model), ("tokenizer", spec.tokenizer_ref)):
        if Path(reference).is_file():
            return None, [f"{where}: {role} {reference} is a file (give the folder that holds it, or a hub id)"]
    try:
        config = AutoConfig.from_pretrained(
            spec.model, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        if not spec.trust_remote_code and "trust_remote_code" in str(exc):
            return None, [
                f"{where}: {spec.model} needs its own Python code to load "
                "(set trust_remote_code: true on this teacher if you trust it)"
            ]
        return None, [f"{where}: cannot load a model config from {spec.model}: {first_line(exc)}"]
    # A model whose code ships with the checkpoint names its masked-LM class in auto_map instead.
    remote_class = (
        (getattr(config, "auto_map", None) or {}).get("AutoModelForMaskedLM") if spec.trust_remote_code else None
    )
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and remote_class is None:
        return None, [f"{where}: {spec.model} is a '{config.model_type}' model, not a masked LM (use a *ForMaskedLM)"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.tokenizer_ref,
            revision=spec.revision if not spec.tokenizer else None,
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception as exc:
        return None, [f"{where}: cannot load a tokenizer from {spec.tokenizer_ref}: {first_line(exc)}"]
    problems = []
    if not getattr(tokenizer, "is_fast", False):
        problems.append(f"{where}: tokenizer {spec.tokenizer_ref} has no fast (Rust) version, which mdkd needs")
    if tokenizer.mask_token_id is None:
        problems.append(f"{where}: tokenizer {spec.tokenizer_ref} has no mask token (a masked LM tokenizer needs one)")
    if len(tokenizer) > config.vocab_size:
        problems.append(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size} "
            "(give the tokenizer that was trained with this model)"
        )
    # Scoring takes the top-k over the tokenizer's ids (a head padded past them never counts), so they bound k.
    if top_k > len(tokenizer):
        problems.append(f"{where}: top_k {top_k} is larger than its vocabulary of {len(tokenizer)} (lower top_k)")
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        problems.append(
            f"{where}: max_length {max_length} is longer than the {limit} positions the model takes (lower max_length)"
        )
    if Path(spec.model).is_dir() and not weight_files(Path(spec.model)):
        problems.append(f"{where}: {spec.model} holds no weight files (*.safetensors or *.bin)")
    # Recorded in the manifest: a resume, and a student that inherits this teacher, check the weights against it.
    weights = weights_identity(spec.model, spec.revision, config)
    architecture = (config.architectures or [MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(config.model_type, remote_class)])[0]
    classes, representatives = twin_classes(
        canonical_tokens(
            spec.name, json.loads(tokenizer.backend_tokenizer.to_str()), len(tokenizer), special_token_ids(tokenizer)
        )
    )
    if top_k > len(representatives):
        problems.append(
            f"{where}: top_k {top_k} is larger than its {len(representatives)} distinct tokens (its ids that share a "
            "spelling count once; lower top_k)"
        )
    info = TeacherInfo(
        spec, tokenizer, config.model_type, architecture, config.vocab_size, weights, classes, representatives
    )
    return info, problems


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, otherwise fp32."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def newly_initialised(model: nn.Module, missing_keys: set[str]) -> list[str]:
    """The weights transformers initialised at random because the checkpoint lacks them, head first.

    A key tied to another missing key (BERT's decoder bias is its prediction bias) is one weight, named once. The
    decoder weight tied to the input embeddings is never reported missing when the embeddings were loaded.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    weights = [key for key in missing_keys if tied.get(key) not in missing_keys]
    prefix = getattr(model, "base_model_prefix", "") + "."
    return sorted(weights, key=lambda key: (key.startswith(prefix), key))


def _refuse_missing_weights(info: TeacherInfo, model: nn.Module, missing: list[str]) -> UserError:
    """One line naming the checkpoint and its missing weights: the head's when it has none, else the encoder's."""
    listed = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    count = (
        f"{len(missing)} weights of {type(model).__name__} are"
        if len(missing) > 1
        else f"1 weight of {type(model).__name__} is"
    )
    where = f"teacher {info.spec.name}: checkpoint {info.spec.model}"
    if not missing[0].startswith(getattr(model, "base_model_prefix", "") + "."):
        return UserError(
            f"{where} has no masked-LM head: {count} newly initialised ({listed}); give a *ForMaskedLM checkpoint"
        )
    return UserError(f"{where} is incomplete: {count} newly initialised ({listed}); give the full checkpoint")


class Teacher:
    """A loaded teacher in eval mode that returns top-k log-probabilities at masked positions."""

    def __init__(self, info: TeacherInfo, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForMaskedLM

        spec = info.spec
        try:
            with transformers_console(Ranks.from_env()):
                model, loading = AutoModelForMaskedLM.from_pretrained(
                    spec.model,
                    revision=spec.revision,
                    dtype=dtype,
                    trust_remote_code=spec.trust_remote_code,
                    output_loading_info=True,
                )
        except Exception as exc:
            raise UserError(f"teacher {spec.name}: cannot load {spec.model}: {first_line(exc)}") from None
        # Weights missing from the checkpoint are random: their predictions must not be cached as a teacher's.
        missing = newly_initialised(model, set(loading["missing_keys"]))
        if missing:
            raise _refuse_missing_weights(info, model, missing)
        self.model = model.to(device).eval()
        self.device = device
        self.adapter = ADAPTERS.get(info.model_type)
        pad = info.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (model.config.pad_token_id or 0))
        # Models often pad their embedding matrix past the tokenizer (to a multiple of 8 or 128); those rows
        # are not tokens, so predictions are taken over the tokenizer's ids only.
        self.vocab_limit = len(info.tokenizer)
        # Twins are summed on the device; a tokenizer without twins skips the grouping (classes are the ids).
        twins = len(info.representatives) < len(info.classes)
        self.classes = torch.from_numpy(info.classes).to(device) if twins else None
        self.representatives = torch.from_numpy(info.representatives).to(device)

    def top_k(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        k: int,
        temperatures: list[float],
        tail_uniforms: torch.Tensor | None = None,
        tail_temperature: float | None = None,
    ) -> Scored:
        """The teacher's predictions at positions (rows[i], cols[i]) of a padded batch, over its canonical tokens:
        the probabilities of twins (ids with one canonical token, `.` and `##.`) are summed first, so each token
        is counted once with its whole mass and is represented by its smallest id.

        Returns the top-k (log-probabilities [N, k], representative ids [N, k]); the tempered log-partitions
        [N, T], logsumexp_c(log p_c / tau) over every token for each tau, so that the exact tempered probability
        of a cached token is exp(log p_c / tau - A_tau) and everything outside the top-k holds one minus their
        sum; the entropies [N] of the whole distribution; and, given `tail_uniforms` [N, M] in [0, 1), M draws
        per position from the distribution at `tail_temperature` restricted to the tokens outside the top-k (by
        inverse CDF, so the draws depend on the uniforms alone): their ids and log-probabilities at tau = 1, [N, M].
        All on the CPU; `predict` is the same without waiting for them.

        Log-softmax is taken in fp32 whatever the model's dtype, over the tokenizer's ids (rows of a padded
        embedding are no tokens, and get no mass).
        """
        packed = self.predict(
            input_ids, attention_mask, rows, cols, k, temperatures, tail_uniforms, tail_temperature
        ).wait()
        samples = 0 if tail_uniforms is None else tail_uniforms.shape[1]
        scored = self.unpack(packed, k, len(temperatures), samples)
        tail = None if scored.tail is None else tuple(t.contiguous() for t in scored.tail)
        return Scored(*(t.contiguous() for t in scored[:4]), tail)

    @torch.inference_mode()
    def predict(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        k: int,
        temperatures: list[float],
        tail_uniforms: torch.Tensor | None = None,
        tail_temperature: float | None = None,
    ) -> HostCopy:
        """`top_k`'s results packed into one [N, 2k + T + 1 + 2M] float32 tensor (ids as their int32 bits, see
        `unpack`) and sent to the host in one copy that the caller waits for when it needs them."""
        # Inputs in page-locked memory go over without the host waiting; a blocking copy would wait for every
        # batch queued before it.
        rows, cols = rows.to(self.device, non_blocking=True), cols.to(self.device, non_blocking=True)
        logits = masked_logits(
            self.model,
            self.adapter,
            input_ids.to(self.device, non_blocking=True),
            attention_mask.to(self.device, non_blocking=True),
            rows,
            cols,
            self.device,
        )
        logprobs = torch.log_softmax(logits[:, : self.vocab_limit].float(), dim=-1)
        if self.classes is not None:
            logprobs = _class_logsumexp(logprobs, self.classes, len(self.representatives))
        values, classes = logprobs.topk(k, dim=-1)
        partitions = torch.stack([torch.logsumexp(logprobs / tau, dim=-1) for tau in temperatures], dim=1)
        entropies = -(logprobs.exp() * logprobs).sum(dim=-1)
        parts = [values, self._ids(classes).view(torch.float32), partitions, entropies.unsqueeze(1)]
        if tail_uniforms is not None:
            uniforms = tail_uniforms.to(self.device, non_blocking=True)
            drawn = _draw_outside(logprobs, classes, uniforms, tail_temperature)
            tail_ids = self._ids(drawn.clamp(min=0)).masked_fill(drawn < 0, -1)
            parts += [tail_ids.view(torch.float32), logprobs.gather(1, drawn.clamp(min=0))]
        return HostCopy(torch.cat(parts, dim=1))

    @staticmethod
    def unpack(packed: torch.Tensor, k: int, temperatures: int, samples: int) -> Scored:
        """`predict`'s packed results on the host, as views: what `top_k` returns."""
        split = [k, k, temperatures, 1] + ([samples, samples] if samples else [])
        values, ids, partitions, entropies, *tail = torch.split(packed, split, dim=1)
        return Scored(
            values,
            ids.view(torch.int32),
            partitions,
            entropies[:, 0],
            (tail[0].view(torch.int32), tail[1]) if tail else None,
        )

    def _ids(self, classes: torch.Tensor) -> torch.Tensor:
        """Representative teacher ids (int32) of canonical-token classes."""
        return (classes if self.classes is None else self.representatives[classes]).to(torch.int32)


class Scored(NamedTuple):
    """What `Teacher.top_k` returns (see there)."""

    values: torch.Tensor
    ids: torch.Tensor
    partitions: torch.Tensor
    entropies: torch.Tensor
    tail: tuple[torch.Tensor, torch.Tensor] | None


class HostCopy:
    """A tensor on its way to host memory. From a CUDA device it is one non-blocking copy into page-locked memory,
    recorded by an event, so the host queues the next batch while it runs; `wait` blocks until it has landed.
    Elsewhere the copy is made at once (on the CPU it is no copy)."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor.cpu()

    def wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def _class_logsumexp(logprobs: torch.Tensor, classes: torch.Tensor, count: int) -> torch.Tensor:
    """[N, V] log-probabilities of ids -> [N, count] of their classes (logsumexp over each class's ids), stably:
    each class's largest member is subtracted before the sum."""
    index = classes.unsqueeze(0).expand_as(logprobs)
    largest = torch.full((logprobs.shape[0], count), -torch.inf, device=logprobs.device)
    largest = largest.scatter_reduce(1, index, logprobs, reduce="amax", include_self=True)
    shifted = (logprobs - largest.gather(1, index)).exp()
    sums = torch.zeros_like(largest).scatter_add_(1, index, shifted)
    return largest + sums.log()


def _draw_outside(
    logprobs: torch.Tensor, top: torch.Tensor, uniforms: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[N, M] token indices drawn from softmax(logprobs / temperature) with the `top` indices excluded, by
    inverse CDF of `uniforms`; -1 for a position whose distribution outside `top` has no mass."""
    tempered = torch.softmax(logprobs / temperature, dim=-1).scatter(1, top, 0.0)
    cdf = tempered.cumsum(dim=-1)
    total = cdf[:, -1:]
    # searchsorted(right) picks the first token whose cumulative mass exceeds the target: never one of mass 0.
    drawn = torch.searchsorted(cdf, (uniforms * total).contiguous(), right=True).clamp(max=logprobs.shape[1] - 1)
    return drawn.masked_fill(total <= 0, -1)
