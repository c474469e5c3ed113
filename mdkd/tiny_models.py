"""Small tokenizers and masked LMs built locally, shared by the demo (its teachers), the tests (conftest's
teachers), the benchmarks (bench/) and the tiny example (examples/tiny/make_teachers.py).

It is a module of its own, at the top of the package: not under pipeline/, because mdkd's pipeline reads whatever
masked LMs it is given and builds none, and not under demo/, because the tests, benchmarks and examples need it
without the demo.

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
    # Every role set, to the tokenizer's id or None: an architecture's defaults point into its hub vocabulary.
    special_ids = {
        f"{role}_token_id": getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "cls", "sep")
    }
    config = tiny_config(model_type, len(tokenizer), pad, special_ids=special_ids, **sizes)
    model = AutoModelForMaskedLM.from_config(config)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


def masked_lm_windows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Every document cut into consecutive windows of at most `max_length` ids, specials included, as stage one
    cuts them (the tokenizer's overflow): the whole text, not only each document's opening (long documents are
    most of the tokens in some languages)."""
    return tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        return_overflowing_tokens=True,
        stride=0,
        return_attention_mask=False,
    )["input_ids"]


def _masked_logits(model, adapter, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the collator's predicted positions, the head run there alone (masked_logits)."""
    from mdkd.pipeline.masked_lm import masked_logits

    rows, cols = (batch["labels"] != -100).nonzero(as_tuple=True)
    logits = masked_logits(model, adapter, batch["input_ids"], batch["attention_mask"], rows, cols, model.device)
    return logits, batch["labels"][rows, cols]


def pretrain_masked_lm(
    model,
    tokenizer,
    texts: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    max_length: int = 64,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """MLM pre-training on every window of `texts` (BERT's 80/10/10 masking via transformers' collator, 5 %
    warm-up, linear decay); returns the losses.

    Measured in shared/notes/tiny-teachers.md and issue 10: a pre-norm ModernBERT of hidden 128 leaves the
    frequent-token plateau within a few hundred steps at lr 2e-3, where post-norm BERT or XLM-R sit on it for
    thousands; 4e-3 does not leave it at all.
    """
    import random

    from transformers import DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

    from mdkd.pipeline.masked_lm import ADAPTERS

    rng = random.Random(seed)
    torch.manual_seed(seed)
    windows = masked_lm_windows(tokenizer, texts, max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    adapter = ADAPTERS[model.config.model_type]
    model.train()
    losses = []
    for _ in range(steps):
        batch = collator([{"input_ids": windows[rng.randrange(len(windows))]} for _ in range(batch_size)])
        logits, labels = _masked_logits(model, adapter, batch)
        loss = torch.nn.functional.cross_entropy(logits, labels)
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


@torch.no_grad()
def masked_lm_accuracy(model, tokenizer, texts: list[str], max_length: int = 64, seed: int = 0) -> dict:
    """Accuracy on held-out `texts` at positions replaced by the mask token (15 % of each window; no kept or
    random replacements, which would let a model score by copying its input), beside the accuracy of always
    predicting the most frequent label there: the bar a model that learnt nothing but token frequencies clears."""
    from collections import Counter

    from transformers import DataCollatorForLanguageModeling

    from mdkd.pipeline.masked_lm import ADAPTERS

    torch.manual_seed(seed)
    windows = masked_lm_windows(tokenizer, texts, max_length)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=0.15, mask_replace_prob=1.0, random_replace_prob=0.0, return_tensors="pt"
    )
    adapter = ADAPTERS[model.config.model_type]
    model.eval()
    correct, labels_seen = 0, Counter()
    for start in range(0, len(windows), 64):
        batch = collator([{"input_ids": window} for window in windows[start : start + 64]])
        logits, labels = _masked_logits(model, adapter, batch)
        correct += (logits.argmax(-1) == labels).sum().item()
        labels_seen.update(labels.tolist())
    positions = sum(labels_seen.values())
    if not positions:
        return {"positions": 0}
    return {
        "positions": positions,
        "accuracy": correct / positions,
        "most_frequent_token_accuracy": labels_seen.most_common(1)[0][1] / positions,
    }
