"""Canonical tokens across WordPiece, SentencePiece-style Unigram and byte-level BPE; the merged vocabulary."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import sentences

from mdkd.pipeline.canonical import DROPPED, WORD_BOUNDARY, Canonicaliser, Family
from mdkd.pipeline.distill.student_tokenizer import MAX_WORD_CHARS, STUDENT_SPECIALS, student_tokenizer
from mdkd.pipeline.distill.vocab import (
    Alignment,
    TeacherVocabulary,
    TokenTally,
    build_alignment,
    map_by_canonical,
    teacher_token_shares,
    why_never_emitted,
)
from mdkd.pipeline.teacher_pass.teachers import special_token_ids
from mdkd.tiny_models import train_tokenizer

FAMILIES = ("wordpiece", "unigram", "bytelevel")
# Chinese text, so that every family holds CJK pieces: WordPiece as words of their own, Unigram and byte-level
# BPE glued to their neighbours (the latter also as byte fragments).
CHINESE = [
    "我们今天去公园散步。",
    "他在图书馆读书，她在家里写信。",
    "这本书很好看，我已经读了两遍。",
    "天气很好，我们去河边走走吧！",
    "学生们在教室里学习中文。",
]
# Text for the student tokenizer: the training text plus what its normaliser and pre-tokenizer treat specially.
PROBES = [
    "Hello, world! It's 5€ (or $5) -- see https://example.org/a_b?c=d&e.",
    "中文 English, 混合。我们！",
    "tab\there, zero\u200bwidth, soft\u00adhyphen, NUL\x00, replacement \ufffd, ▁ literal, «quotes» … and ‰",
    "THE The the İstanbul ÄÖÜ straße",
    "a" * (MAX_WORD_CHARS + 1),
    "b" * MAX_WORD_CHARS,
    "x" + "y" * (MAX_WORD_CHARS - 1),
    "u\u0308ber über",
    "[MASK] [CLS] [de_bert:unused3] <0xE2> ##ing",
]


@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory) -> dict:
    """The three families trained on the same English and Chinese text, saved the way stage one copies them."""
    root = tmp_path_factory.mktemp("families")
    texts = sentences("en") * 3 + CHINESE * 10
    return {family: (train_tokenizer(family, texts, 500, root / family), root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def trained(trained_tokenizers) -> dict[str, TeacherVocabulary]:
    """The three families read back the way stage two reads a cache's tokenizer copies."""
    return {
        family: TeacherVocabulary.from_tokenizer_file(
            family, folder / "tokenizer.json", len(tokenizer), special_token_ids(tokenizer)
        )
        for family, (tokenizer, folder) in trained_tokenizers.items()
    }


@pytest.fixture(scope="module")
def union(trained) -> Alignment:
    return build_alignment(list(trained.values()))


def test_families_are_detected(trained):
    assert {name: v.family.name for name, v in trained.items()} == {
        "wordpiece": "wordpiece",
        "unigram": "sentencepiece",
        "bytelevel": "bytelevel",
    }


def test_whole_words_and_continuations_meet_in_one_canonical_form(trained):
    shared = (
        set(trained["wordpiece"].canonical) & set(trained["unigram"].canonical) & set(trained["bytelevel"].canonical)
    )
    # Frequent whole words of the text are word-start tokens in all three families.
    assert "the" in shared
    assert sum(1 for t in shared if t.isalpha() and len(t) > 1) >= 5
    assert any(token.startswith("##") and len(token) > 2 for token in shared), "some continuation pieces are shared"
    assert set(STUDENT_SPECIALS) <= shared


WORDPIECE, SENTENCEPIECE, BYTELEVEL = (
    Family("wordpiece", "##", False),
    Family("sentencepiece", "▁", False),
    Family("bytelevel", "", False),
)


@pytest.mark.parametrize(
    "family, token, canonical",
    [
        (WORDPIECE, "##ing", "##ing"),
        (WORDPIECE, "the", "the"),
        (SENTENCEPIECE, "▁the", "the"),
        (SENTENCEPIECE, "ing", "##ing"),
        (SENTENCEPIECE, "▁", WORD_BOUNDARY),
        (SENTENCEPIECE, "<0xe2>", "<0xE2>"),
        (BYTELEVEL, "Ġthe", "the"),
        (BYTELEVEL, "ing", "##ing"),
        (BYTELEVEL, "Ġ", WORD_BOUNDARY),
        (BYTELEVEL, "ĠÐ", "<0xD0>"),  # half of a Cyrillic letter
        (BYTELEVEL, "Ð¸", "##и"),
        (BYTELEVEL, "Ċ", "##<0x0A>"),  # a newline never reaches vocab.txt as text; a byte form keeps its `##`
        (WORDPIECE, "u\u0308ber", "über"),  # NFC
        (WORDPIECE, "The", "The"),  # case is kept
        # Punctuation and CJK ideographs always start a word in the student's tokenization: no `##` form.
        (WORDPIECE, "##.", "."),
        (SENTENCEPIECE, ".", "."),
        (SENTENCEPIECE, "▁.", "."),
        (BYTELEVEL, ".", "."),
        (BYTELEVEL, "Ġ.", "."),
        (SENTENCEPIECE, "中", "中"),
        (SENTENCEPIECE, "▁中文", "中文"),
        (BYTELEVEL, "ä¸Ń", "中"),
        (BYTELEVEL, "'s", "'s"),
        (SENTENCEPIECE, "'s", "'s"),
        (SENTENCEPIECE, "a.", "##a."),  # only the first character decides
        (WORDPIECE, "##€", "##€"),  # a symbol BERT keeps inside words (`5€` is `5 ##€`) keeps both forms
        (SENTENCEPIECE, "€", "##€"),
        # A SentencePiece marker inside a piece is a space, like byte-level's `Ġ`.
        (SENTENCEPIECE, "▁▁", "<0x20>"),
        (BYTELEVEL, "ĠĠ", "<0x20>"),
        (SENTENCEPIECE, "▁##x", "<0x23><0x23><0x78>"),  # as text it would read as the continuation `##x`
    ],
)
def test_canonical_forms(family, token, canonical):
    assert Canonicaliser(family)(token) == canonical


def _pieces_by_text(family: str, tokenizer) -> dict[str, list[int]]:
    """A trained tokenizer's ids by the text their piece stands for, marker removed (byte fragments left out)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    by_text: dict[str, list[int]] = {}
    for piece, teacher_id in tokenizer.get_vocab().items():
        if family == "wordpiece":
            text = piece.removeprefix("##")
        elif family == "unigram":
            text = piece.removeprefix("▁")
        else:
            try:
                text = bytes(byte_of[char] for char in piece).decode("utf-8").removeprefix(" ")
            except (KeyError, UnicodeDecodeError):
                continue
        by_text.setdefault(text, []).append(teacher_id)
    return by_text


def test_punctuation_and_cjk_pieces_share_one_student_id(trained_tokenizers, union):
    """Every piece of every family that spells one punctuation mark or CJK ideograph, whatever its word-start or
    continuation marker, maps to the one id the student tokenizer itself gives that character."""
    student = student_tokenizer(union.tokens, lowercase=False)
    characters = sorted({c for text in CHINESE for c in text} | set(".,'!"))
    pieces = {family: _pieces_by_text(family, tokenizer) for family, (tokenizer, _) in trained_tokenizers.items()}
    forms_seen = Counter()
    for character in characters:
        student_ids = set()
        for family, by_text in pieces.items():
            student_ids |= {int(union.id_maps[family][teacher_id]) for teacher_id in by_text.get(character, [])}
            forms_seen[family] += len(by_text.get(character, []))
        assert student_ids <= {student.convert_tokens_to_ids(character)}, (
            character,
            [union.tokens[i] for i in student_ids],
        )
        assert student.tokenize(f"a{character}a") == ["a", character, "a"]
    # Not vacuous: each family spells these characters, byte-level BPE in both forms (`æĪĳ`, `ĠæĪĳ`: 我).
    assert all(forms_seen[family] >= 5 for family in FAMILIES), forms_seen
    bytelevel = trained_tokenizers["bytelevel"][0].get_vocab()
    assert (
        union.id_maps["bytelevel"][bytelevel["æĪĳ"]]
        == union.id_maps["bytelevel"][bytelevel["ĠæĪĳ"]]
        == union.tokens.index("我")
    )


def test_lone_word_boundaries_become_one_token(trained_tokenizers, union):
    boundary = union.tokens.index(WORD_BOUNDARY)
    assert union.id_maps["unigram"][trained_tokenizers["unigram"][0].get_vocab()["▁"]] == boundary
    assert union.id_maps["bytelevel"][trained_tokenizers["bytelevel"][0].get_vocab()["Ġ"]] == boundary
    assert why_never_emitted(WORD_BOUNDARY) == "word boundary"


def test_never_emitted_tokens_are_only_the_documented_kinds(union):
    """docs/vocabulary.md: besides `[▁]`, only byte forms and pieces that hold punctuation or CJK inside a longer
    piece (the student splits them). No continuation of a lone punctuation mark or ideograph survives."""
    never = {token: why_never_emitted(token) for token in union.tokens if why_never_emitted(token)}
    assert union.stats["never_emitted"] == dict(sorted(Counter(never.values()).items()))
    assert Counter(never.values())["word boundary"] == 1
    assert set(never.values()) <= {"word boundary", "bytes", "split or normalised"}
    student = student_tokenizer(union.tokens, lowercase=False)
    for token, reason in never.items():
        body = token.removeprefix("##")
        if reason == "split or normalised":
            assert len(body) > 1, token
            assert len(student.tokenize(body)) > 1, token  # split into several words


def _union_with_extras(union: Alignment) -> list[str]:
    """The trained union plus tokens at the edges of the rules: case, length limit, symbols inside words."""
    extras = [
        "The",
        "THE",
        "İstanbul",
        "a" * (MAX_WORD_CHARS + 1),
        "b" * MAX_WORD_CHARS,
        "##" + "y" * (MAX_WORD_CHARS - 1),
        "##" + "y" * MAX_WORD_CHARS,
        "€",
        "##€",
        "x",
        "5",
        "##\u0308",
        "straße",
        "über",
        "▁",
    ]
    return union.tokens + [token for token in extras if token not in union.tokens]


@pytest.mark.parametrize("lowercase", [False, True])
def test_emittable_is_exactly_what_the_student_tokenizer_emits(union, lowercase):
    tokens = _union_with_extras(union)
    student = student_tokenizer(tokens, lowercase)
    texts = sentences("en") + sentences("de") + sentences("ru") + CHINESE + PROBES
    emitted = {token for text in texts for token in student.convert_ids_to_tokens(student(text)["input_ids"])}
    assert len(emitted) > 100
    # Whatever the student tokenizer emits is classed emittable...
    assert {token for token in emitted if why_never_emitted(token, lowercase)} == set()
    # ... and whatever is classed emittable has a text that yields it: itself, or itself after a word start.
    starts = [token for token in tokens if len(token) == 1 and token.isalpha() and token == token.lower()]
    for token in tokens:
        if token in STUDENT_SPECIALS or why_never_emitted(token, lowercase):
            continue
        candidates = [token] if not token.startswith("##") else [start + token[2:] for start in starts]
        assert any(token in student.tokenize(text) for text in candidates), token
    never = {token for token in tokens if why_never_emitted(token, lowercase)}
    assert "▁" not in never  # the literal character U+2581 is text like any other
    assert {"a" * (MAX_WORD_CHARS + 1), "##" + "y" * MAX_WORD_CHARS} <= never
    assert ("The" in never) == lowercase


def test_student_vocabulary_reads_back_unchanged(union, tmp_path):
    """The exported student tokenizer, read as a WordPiece teacher (as `mdkd evaluate` does), gives every token
    back: canonical forms are fixed points, so teacher ids map onto the student's own ids."""
    student = student_tokenizer(union.tokens, lowercase=False)
    student.save_pretrained(tmp_path)
    own = TeacherVocabulary.from_tokenizer("student", tmp_path, student)
    assert own.canonical == union.tokens
    for name in union.id_maps:
        vocabulary = TeacherVocabulary(name, Family("plain", "", False), [union.tokens[i] for i in union.id_maps[name]])
        assert np.array_equal(map_by_canonical(vocabulary, own.canonical), union.id_maps[name])


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
    assert stats["shared_tokens"]["wordpiece"]["unigram"] == len(
        set(trained["wordpiece"].canonical) & set(trained["unigram"].canonical)
    )
    assert stats["lowercase"] is False


def test_size_cap_keeps_the_most_frequent_tokens(trained):
    vocabulary = trained["wordpiece"]
    words = [t for t in vocabulary.canonical if t not in STUDENT_SPECIALS]
    frequencies = {"wordpiece": Counter({words[3]: 50, words[7]: 40, words[1]: 40, words[0]: 1})}
    alignment = build_alignment([vocabulary], frequencies, max_size=len(STUDENT_SPECIALS) + 3)
    assert alignment.tokens == list(STUDENT_SPECIALS) + [words[1], words[3], words[7]]  # ties keep union order
    ids = alignment.id_maps["wordpiece"]
    assert ids[vocabulary.canonical.index(words[0])] == DROPPED
    assert alignment.input_map("wordpiece")[vocabulary.canonical.index(words[0])] == alignment.unk_id
    assert alignment.stats["teachers"]["wordpiece"]["tokens_dropped"] == len(vocabulary.canonical) - len(
        alignment.tokens
    )


def test_teacher_token_shares_on_a_hand_made_case():
    specials = list(STUDENT_SPECIALS)
    sp = TeacherVocabulary("sp", SENTENCEPIECE, specials + ["the", "##s", WORD_BOUNDARY, "a.b", "rare"])
    wp = TeacherVocabulary("wp", WORDPIECE, specials + ["the", "cat", "##s"])
    frequencies = {"sp": Counter({"the": 5, "##s": 3, WORD_BOUNDARY: 2, "a.b": 1}), "wp": Counter({"cat": 1})}
    alignment = build_alignment([sp, wp], frequencies, max_size=len(specials) + 5)  # drops "rare"
    assert alignment.id_maps["sp"][9] == DROPPED
    # sp ids: 2 [CLS], 3 [SEP] special; 5 the, 6 ##s shared with wp; 7 [▁], 8 a.b never emitted; 9 rare dropped.
    counts = np.array([0, 0, 10, 10, 0, 40, 20, 10, 5, 5])
    topk_ids = np.array([[5, 7, 9], [6, 8, 2]])
    topk_probs = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]])
    tally = TokenTally(counts, np.bincount(topk_ids.ravel(), weights=topk_probs.ravel(), minlength=10), positions=2)
    shares = teacher_token_shares(alignment, "sp", tally)
    assert shares["input_tokens"] == 100 and shares["positions"] == 2
    assert shares["topk_mass"] == pytest.approx(0.9) and shares["mass_dropped"] == pytest.approx(0.05)
    assert shares["input"] == pytest.approx({"shared": 0.6, "never_emitted": 0.15, "dropped": 0.05, "special": 0.2})
    assert shares["topk"] == pytest.approx(
        {"shared": 1.1 / 1.8, "never_emitted": 0.5 / 1.8, "dropped": 0.1 / 1.8, "special": 0.1 / 1.8}
    )
    # wp shares `the` and `##s` with sp; its `cat` is its own.
    wp_tally = TokenTally(np.array([0, 0, 1, 1, 0, 4, 3, 1]), np.array([0, 0, 0, 0, 0, 0.25, 0.5, 0]), positions=1)
    wp_shares = teacher_token_shares(alignment, "wp", wp_tally)
    assert wp_shares["input"] == pytest.approx({"shared": 0.5, "never_emitted": 0.0, "dropped": 0.0, "special": 0.2})
    assert wp_shares["topk"]["shared"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        teacher_token_shares(alignment, "sp", TokenTally(counts[:-1], tally.topk_mass, 2))
