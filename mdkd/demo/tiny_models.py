"""Small tokenizers and masked LMs built locally, for the demo, the benchmarks, the tests and the examples.

No model hub is needed: `tokenizers` trains a vocabulary in well under a second, and a masked LM of any of the
supported architectures is built from a small transformers config and saved with `save_pretrained`, exactly
like a hub checkpoint a user would download. The three subword families mdkd aligns are all here: WordPiece
(`##x` continues a word), SentencePiece-style Unigram (`▁x` starts a word) and byte-level BPE (`Ġx`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
FAMILIES = ("wordpiece", "unigram", "bytelevel")


def train_tokenizer(family: str, texts: Iterable[str], vocab_size: int, out_dir: str | Path, lowercase: bool = False):
    """Train a fast tokenizer of one subword family on `texts`, save it to `out_dir`, and return it."""
    from transformers import PreTrainedTokenizerFast

    if family == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
        specials = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    elif family == "unigram":
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        )
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=ROBERTA_SPECIALS, unk_token="<unk>", show_progress=False
        )
    elif family == "bytelevel":
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.Lowercase() if lowercase else None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=ROBERTA_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; use one of {FAMILIES}")
    backend.train_from_iterator(texts, trainer)
    if family == "wordpiece":
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    else:
        bos, eos = ("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[bos, eos]
        )
        specials = dict(
            bos_token="<s>",
            eos_token="</s>",
            cls_token="<s>",
            sep_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


ARCHITECTURES = ("bert", "xlm-roberta", "roberta", "albert", "distilbert", "deberta-v2", "modernbert")


def tiny_config(
    model_type: str,
    vocab_size: int,
    pad_token_id: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 512,
    special_ids: dict[str, int] | None = None,
):
    """A small transformers config of `model_type` whose embedding fits `vocab_size` ids.

    `special_ids` (e.g. cls_token_id) overrides the architecture's defaults, which point into its own hub vocabulary.
    """
    special_ids = special_ids or {}
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id)
    sizes = {
        "distilbert": dict(
            dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden, max_position_embeddings=max_positions
        ),
        "albert": dict(
            hidden_size=hidden,
            embedding_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions,
        ),
        "modernbert": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions,
            global_attn_every_n_layers=2,
            local_attention=16,
        ),
    }.get(
        model_type,
        dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions + 2,
        ),
    )
    if model_type in ("roberta", "xlm-roberta"):
        common["type_vocab_size"] = 1
    return AutoConfig.for_model(model_type, **common, **sizes, **special_ids)


def build_masked_lm(model_type: str, tokenizer, out_dir: str | Path | None = None, seed: int = 0, **sizes):
    """A randomly initialised `*ForMaskedLM` for `tokenizer`; saved to `out_dir` (with the tokenizer) if given."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special_ids = {
        f"{role}_token_id": getattr(tokenizer, f"{role}_token_id")
        for role in ("bos", "eos", "cls", "sep")
        if getattr(tokenizer, f"{role}_token_id", None) is not None
    }
    config = tiny_config(model_type, len(tokenizer), pad, special_ids=special_ids, **sizes)
    model = AutoModelForMaskedLM.from_config(config)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


def pretrain_masked_lm(
    model,
    tokenizer,
    texts: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    max_length: int = 64,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """A short MLM pre-training on `texts` (BERT masking via transformers' collator); returns the losses.

    Enough for the demo's teachers to learn their language's frequent words: they then have real knowledge
    for a student to inherit, unlike random weights.
    """
    import random

    from transformers import DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

    from mdkd.pipeline.teacher_pass.teachers import ADAPTERS

    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    model.train()
    losses = []
    adapter = ADAPTERS[model.config.model_type]
    for _ in range(steps):
        batch = collator([{"input_ids": encoded[rng.randrange(len(encoded))]} for _ in range(batch_size)])
        # The vocabulary projection only where a token is predicted: about 7x less work than the full head.
        hidden = getattr(model, adapter.encoder)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[
            0
        ]
        predicted = batch["labels"] != -100
        loss = torch.nn.functional.cross_entropy(adapter.head(model, hidden[predicted]), batch["labels"][predicted])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.2f}")
    model.eval()
    return losses
