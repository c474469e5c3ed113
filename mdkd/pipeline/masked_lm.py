"""Where the encoder and the MLM head live in transformers' `*ForMaskedLM` models, for every part of mdkd that
runs one: teachers in stage one, the student in stage two, evaluation.

Running the encoder on the whole batch and the MLM head (the vocabulary projection, by far the largest matrix
product for a 120k-token vocabulary) only on the hidden states at masked positions is several times cheaper
than the full forward. Known architectures get an adapter that says where the encoder and the head are; any
other masked LM falls back to the full forward, which gives the same numbers at a higher cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MaskedLMAdapter:
    """Where the encoder lives in a `*ForMaskedLM` model, and how to apply its head to [N, hidden] states."""

    encoder: str
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _deberta_v2_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if getattr(model, "legacy", True):
        return model.cls(hidden)
    return model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings)


def _distilbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    hidden = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    return model.vocab_projector(hidden)


ADAPTERS: dict[str, MaskedLMAdapter] = {
    "bert": MaskedLMAdapter("bert", lambda m, h: m.cls(h)),
    "roberta": MaskedLMAdapter("roberta", lambda m, h: m.lm_head(h)),
    "xlm-roberta": MaskedLMAdapter("roberta", lambda m, h: m.lm_head(h)),
    "camembert": MaskedLMAdapter("roberta", lambda m, h: m.lm_head(h)),
    "albert": MaskedLMAdapter("albert", lambda m, h: m.predictions(h)),
    "distilbert": MaskedLMAdapter("distilbert", _distilbert_head),
    "deberta-v2": MaskedLMAdapter("deberta", _deberta_v2_head),
    "modernbert": MaskedLMAdapter("model", lambda m, h: m.decoder(m.head(h))),
}


def masked_logits(
    model: nn.Module, adapter: MaskedLMAdapter | None, input_ids, attention_mask, rows, cols, device
) -> torch.Tensor:
    """Vocabulary logits [N, V] at positions (rows[i], cols[i]) of a padded batch: the MLM head runs only there
    when the architecture has an adapter, otherwise the full forward is gathered."""
    input_ids = input_ids.to(device, non_blocking=True)
    attention_mask = attention_mask.to(device, non_blocking=True)
    rows, cols = rows.to(device), cols.to(device)
    if adapter is not None:
        hidden = getattr(model, adapter.encoder)(input_ids=input_ids, attention_mask=attention_mask)[0]
        return adapter.head(model, hidden[rows, cols])
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
