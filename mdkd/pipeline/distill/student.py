"""The student: a masked LM over the merged vocabulary (a fresh BERT or ModernBERT, or a teacher's architecture and
weights when it inherits them, inherit.py), and its export as an ordinary HF folder.

The forward pass runs the encoder on the whole batch and the vocabulary projection only at masked positions,
so no [batch, sequence, vocabulary] tensor is ever built. The exported folder holds the model and a WordPiece
tokenizer (`BertTokenizerFast`-compatible) over the merged vocabulary; `AutoModelForMaskedLM`,
`AutoTokenizer` and the `fill-mask` pipeline load it offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mdkd.pipeline.cache.manifest import ShardEntry
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.distill.config import StudentConfig
from mdkd.pipeline.distill.inherit import inherit_student, longest_input, model_input_names
from mdkd.pipeline.distill.losses import DistillationLoss, position_losses, projected_losses
from mdkd.pipeline.distill.student_tokenizer import STUDENT_SPECIALS, student_tokenizer
from mdkd.pipeline.distill.vocab import Alignment
from mdkd.pipeline.masked_lm import ADAPTERS, masked_logits


class MaskedLMStudent(nn.Module):
    """Wraps a `*ForMaskedLM` so DeepSpeed sees one forward: (batch, masked positions) -> logits [N, V], or with a
    `DistillationLoss` -> (total, KD [N], MLM [N]) without building the logits (`projected_losses`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.adapter = ADAPTERS[model.config.model_type]
        self.projection = self._vocabulary_projection()
        if self.projection is not None:
            import deepspeed

            # projected_losses reads the projection's weight and bias outside its module's forward: ZeRO-3 must
            # gather them for this module's forward and backward (a no-op record under the other stages).
            for parameter in self.projection.parameters():
                deepspeed.zero.register_external_parameter(self, parameter)

    def _vocabulary_projection(self) -> nn.Linear | None:
        """The head's last layer (hidden -> vocabulary) for the architectures whose head splits into a transform
        and that layer; None: the loss takes the whole head's logits."""
        model_type = self.model.config.model_type
        if model_type == "bert":
            return self.model.cls.predictions.decoder
        if model_type == "modernbert":
            return self.model.decoder
        return None

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head up to the vocabulary projection (only where `projection` is known)."""
        if self.model.config.model_type == "bert":
            return self.model.cls.predictions.transform(hidden)
        return self.model.head(hidden)

    def forward(self, input_ids, attention_mask, rows, cols, loss: DistillationLoss | None = None):
        if loss is None:
            return masked_logits(self.model, self.adapter, input_ids, attention_mask, rows, cols, input_ids.device)
        hidden = getattr(self.model, self.adapter.encoder)(input_ids=input_ids, attention_mask=attention_mask)[0]
        hidden = hidden[rows, cols]
        if self.projection is None:
            kd, mlm = position_losses(self.adapter.head(self.model, hidden), loss.targets, loss.settings)
            return ((1.0 - loss.alpha) * mlm + loss.alpha * kd).sum(), kd.detach(), mlm.detach()
        return projected_losses(self._transform(hidden), self.projection.weight, self.projection.bias, loss)


def initial_student(
    settings: StudentConfig, alignment: Alignment, cache: CacheReader, shards: list[ShardEntry], seed: int
) -> tuple[MaskedLMStudent, dict | None]:
    """The student a run starts from, and (when it inherits a teacher's weights) how its rows were made."""
    if settings.init is None:
        return build_student(settings, len(alignment.tokens), cache.manifest.max_length, seed), None
    inheritance = inherit_student(settings.init, cache, alignment, shards, seed)
    return MaskedLMStudent(inheritance.model), inheritance.stats(settings.init.teacher)


def build_student(settings: StudentConfig, vocab_size: int, max_positions: int, seed: int) -> MaskedLMStudent:
    """A freshly initialised student; the same seed gives the same weights."""
    from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    sizes = settings.sizes()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=max(512, max_positions),
        pad_token_id=STUDENT_SPECIALS.index("[PAD]"),
    )
    if settings.architecture == "modernbert":
        # Its defaults name ids in ModernBERT's own hub vocabulary: point every special role at the student's.
        cls, sep = STUDENT_SPECIALS.index("[CLS]"), STUDENT_SPECIALS.index("[SEP]")
        config = ModernBertConfig(
            **common,
            bos_token_id=cls,
            cls_token_id=cls,
            eos_token_id=sep,
            sep_token_id=sep,
            embedding_dropout=settings.dropout,
            mlp_dropout=settings.dropout,
            attention_dropout=settings.dropout,
        )
        model_class = ModernBertForMaskedLM
    else:
        config = BertConfig(
            **common, hidden_dropout_prob=settings.dropout, attention_probs_dropout_prob=settings.dropout
        )
        model_class = BertForMaskedLM
    torch.manual_seed(seed)
    return MaskedLMStudent(model_class(config))


def export_student(student: MaskedLMStudent, tokens: list[str], lowercase: bool, out_dir: Path) -> None:
    """Save the model and its tokenizer as one HF folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = student.model
    model.save_pretrained(out_dir)
    tokenizer = student_tokenizer(tokens, lowercase, longest_input(model.config))
    # A model whose forward takes no token type ids (DistilBERT, ModernBERT) must not be handed them by fill-mask.
    tokenizer.model_input_names = model_input_names(model)
    tokenizer.save_pretrained(out_dir)
