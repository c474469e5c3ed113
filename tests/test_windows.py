"""Windows cover whole documents; batches respect their budget; masked-only scoring equals the full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import make_documents, sentences

from mdkd.pipeline.masked_lm import ADAPTERS
from mdkd.pipeline.teacher_pass.config import MaskingConfig
from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.windows import length_batches, padded_inputs, prepare_unit
from mdkd.tiny_models import ARCHITECTURES, build_masked_lm, train_tokenizer


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return train_tokenizer("wordpiece", sentences("de") + sentences("en"), 300, tmp_path_factory.mktemp("wp"))


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    return train_tokenizer("unigram", sentences("de") + sentences("ru"), 300, tmp_path_factory.mktemp("ug"))


@pytest.mark.parametrize("max_length", [8, 17, 64])
def test_windows_cover_every_token_of_every_document(wordpiece, max_length):
    documents = [Document(f"de:x:{i}", text) for i, text in enumerate(make_documents("de", 12))]
    masker = Masker(
        MaskingConfig(probability=0.5), wordpiece.mask_token_id, set(wordpiece.all_special_ids), len(wordpiece)
    )
    unit = prepare_unit(documents, wordpiece, masker, max_length, copies=1)
    special = set(wordpiece.all_special_ids)
    for document in documents:
        windows = sorted((e for e in unit.rows if e.doc_id == document.doc_id), key=lambda e: e.window)
        assert [e.window for e in windows] == list(range(len(windows)))
        rebuilt = []
        for example in windows:
            assert len(example.input_ids) <= max_length
            original = example.input_ids.copy()
            original[example.positions] = example.labels
            rebuilt += [int(i) for i in original if i not in special]
        assert rebuilt == wordpiece(document.text, add_special_tokens=False)["input_ids"]


def test_copies_are_masked_independently(wordpiece):
    documents = [Document("de:x:0", make_documents("de", 1)[0])]
    masker = Masker(MaskingConfig(), wordpiece.mask_token_id, set(wordpiece.all_special_ids), len(wordpiece))
    unit = prepare_unit(documents, wordpiece, masker, 512, copies=3)
    assert [(e.window, e.copy) for e in unit.rows] == [(0, 0), (0, 1), (0, 2)]
    assert len({tuple(e.positions) for e in unit.rows}) > 1


def test_length_batches_respect_token_budget_and_batch_size():
    lengths = [5, 100, 7, 64, 64, 3, 128, 9, 10, 11]
    batches = length_batches(lengths, batch_tokens=200, batch_size=None)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 200 or len(b) == 1 for b in batches)
    assert [len(b) for b in length_batches(lengths, batch_tokens=200, batch_size=3)] == [3, 3, 3, 1]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_masked_position_head_equals_full_forward(model_type, wordpiece, unigram):
    tokenizer = unigram if model_type in ("xlm-roberta", "roberta", "modernbert") else wordpiece
    model = build_masked_lm(model_type, tokenizer, seed=3)
    documents = [Document(f"d{i}", text) for i, text in enumerate(make_documents("de", 6))]
    masker = Masker(MaskingConfig(), tokenizer.mask_token_id, set(tokenizer.all_special_ids), len(tokenizer))
    examples = prepare_unit(documents, tokenizer, masker, 24, copies=1).rows
    input_ids, attention_mask, rows, cols = padded_inputs(examples, tokenizer.pad_token_id)
    adapter = ADAPTERS[model_type]
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols]
        hidden = getattr(model, adapter.encoder)(input_ids=input_ids, attention_mask=attention_mask)[0]
        masked_only = adapter.head(model, hidden[rows, cols])
    assert masked_only.shape == (len(rows), len(tokenizer))
    torch.testing.assert_close(masked_only, full, rtol=1e-5, atol=1e-5)
