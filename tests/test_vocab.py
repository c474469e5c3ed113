"""Canonical tokens across WordPiece, SentencePiece-style Unigram and byte-level BPE; the merged vocabulary."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import sentences
from mdkd.demo.tiny_models import train_tokenizer
from mdkd.pipeline.distill.vocab import (
    DROPPED, STUDENT_SPECIALS, Alignment, Canonicaliser, Family, TeacherVocabulary, build_alignment,
)
from mdkd.pipeline.teacher_pass.teachers import special_token_ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, TeacherVocabulary]:
    """The three families trained on the same English text, read back the way stage two reads a cache."""
    root = tmp_path_factory.mktemp("families")
    texts = sentences("en") * 3
    vocabularies = {}
    for family in ("wordpiece", "unigram", "bytelevel"):
        tokenizer = train_tokenizer(family, texts, 500, root / family)
        entry = {"tokenizer_dir": family, "vocab_size": len(tokenizer), "special_token_ids": special_token_ids(tokenizer)}
        vocabularies[family] = TeacherVocabulary.from_cache(root, family, entry)
    return vocabularies


def test_families_are_detected(trained):
    assert {name: v.family.name for name, v in trained.items()} == {
        "wordpiece": "wordpiece", "unigram": "sentencepiece", "bytelevel": "bytelevel"
    }


def test_whole_words_and_continuations_meet_in_one_canonical_form(trained):
    shared = set(trained["wordpiece"].canonical) & set(trained["unigram"].canonical) & set(trained["bytelevel"].canonical)
    # Frequent whole words of the text are word-start tokens in all three families.
    assert "the" in shared
    assert sum(1 for t in shared if t.isalpha() and len(t) > 1) >= 5
    assert any(token.startswith("##") and len(token) > 2 for token in shared), "some continuation pieces are shared"
    assert set(STUDENT_SPECIALS) <= shared


@pytest.mark.parametrize(
    "family, token, canonical",
    [
        (Family("wordpiece", "##", False), "##ing", "##ing"),
        (Family("wordpiece", "##", False), "the", "the"),
        (Family("sentencepiece", "▁", False), "▁the", "the"),
        (Family("sentencepiece", "▁", False), "ing", "##ing"),
        (Family("sentencepiece", "▁", False), "▁", "▁"),
        (Family("sentencepiece", "▁", False), "<0xe2>", "<0xE2>"),
        (Family("bytelevel", "", False), "Ġthe", "the"),
        (Family("bytelevel", "", False), "ing", "##ing"),
        (Family("bytelevel", "", False), "Ġ", "▁"),
        (Family("bytelevel", "", False), "ĠÐ", "<0xD0>"),  # half of a Cyrillic letter
        (Family("bytelevel", "", False), "Ð¸", "##и"),
        (Family("bytelevel", "", False), "Ċ", "##<0x0A>"),  # a newline never reaches vocab.txt as text
        (Family("wordpiece", "##", False), "u\u0308ber", "über"),  # NFC
        (Family("wordpiece", "##", False), "The", "The"),  # case is kept
    ],
)
def test_canonical_forms(family, token, canonical):
    assert Canonicaliser(family)(token) == canonical


def test_id_maps_round_trip_and_specials_unify(trained, tmp_path):
    alignment = build_alignment(list(trained.values()))
    assert alignment.tokens[: len(STUDENT_SPECIALS)] == list(STUDENT_SPECIALS)
    assert len(alignment.tokens) == len(set(alignment.tokens))
    for name, vocabulary in trained.items():
        ids = alignment.id_maps[name]
        assert ids.dtype == np.int32 and len(ids) == len(vocabulary.canonical)
        assert [alignment.tokens[i] for i in ids] == vocabulary.canonical
    mask_ids = {int(alignment.id_maps[n][trained[n].canonical.index("[MASK]")]) for n in trained}
    assert mask_ids == {STUDENT_SPECIALS.index("[MASK]")}
    alignment.save(tmp_path / "vocab")
    loaded = Alignment.load(tmp_path / "vocab", list(trained))
    assert loaded.tokens == alignment.tokens
    assert all(np.array_equal(loaded.id_maps[n], alignment.id_maps[n]) for n in trained)
    stats = json.loads((tmp_path / "vocab" / "stats.json").read_text())
    assert stats["shared_tokens"]["wordpiece"]["unigram"] == len(set(trained["wordpiece"].canonical) & set(trained["unigram"].canonical))


def test_size_cap_keeps_the_most_frequent_tokens(trained):
    vocabulary = trained["wordpiece"]
    words = [t for t in vocabulary.canonical if t not in STUDENT_SPECIALS]
    frequencies = {"wordpiece": Counter({words[3]: 50, words[7]: 40, words[1]: 40, words[0]: 1})}
    alignment = build_alignment([vocabulary], frequencies, max_size=len(STUDENT_SPECIALS) + 3)
    assert alignment.tokens == list(STUDENT_SPECIALS) + [words[1], words[3], words[7]]  # ties keep union order
    ids = alignment.id_maps["wordpiece"]
    assert ids[vocabulary.canonical.index(words[0])] == DROPPED
    assert alignment.input_map("wordpiece")[vocabulary.canonical.index(words[0])] == alignment.unk_id
    assert alignment.stats["teachers"]["wordpiece"]["tokens_dropped"] == len(vocabulary.canonical) - len(alignment.tokens)
