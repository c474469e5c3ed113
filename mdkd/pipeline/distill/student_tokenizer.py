"""What the student tokenizer is, and so what it can emit: its special tokens, its word-length limit, and the
WordPiece tokenizer over the merged vocabulary that every exported student carries.

The vocabulary merge (vocab.py) asks this tokenizer's normaliser and pre-tokenizer (canonical.py defines both)
which merged tokens it can ever emit, and the student export (student.py) saves it; both read it from here.
"""

from __future__ import annotations

from mdkd.pipeline.canonical import student_normalizer, student_pre_tokenizer

STUDENT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # WordPiece's max_input_chars_per_word: a longer word becomes [UNK]


def student_tokenizer(tokens: list[str], lowercase: bool, max_length: int = 512):
    """A WordPiece tokenizer over the merged vocabulary, with BERT's normaliser, pre-tokenizer and templates.

    Accents are kept (`strip_accents=False` is saved, so a reload keeps them too); transformers rebuilds BERT's
    normaliser on load, so there is no NFC step: decomposed input text may meet [UNK] (docs/vocabulary.md).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import BertTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_WORD_CHARS))
    # The canonical form (pipeline/canonical.py) is decided with these two: they must stay the student's own.
    backend.normalizer = student_normalizer(lowercase)
    backend.pre_tokenizer = student_pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
        strip_accents=False,
        model_max_length=max_length,
    )
