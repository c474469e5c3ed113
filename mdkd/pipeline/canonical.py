"""The canonical form of a teacher's tokens: one spelling for every subword convention, shared by both stages.

Teachers spell subwords differently; mdkd brings every token to one canonical form, WordPiece's, because the
exported student tokenizer is a WordPiece (`BertTokenizerFast`) tokenizer:

| family | word start | continuation | detected by |
|---|---|---|---|
| WordPiece | `the` | `##ing` | model type WordPiece |
| SentencePiece (Unigram or BPE) | `▁the` -> `the` | `ing` -> `##ing` | a Metaspace pre-tokenizer or decoder |
| byte-level BPE | `Ġthe` -> `the` | `ing` -> `##ing` | a ByteLevel pre-tokenizer or decoder |

Further rules (docs/vocabulary.md says why):
- Case is kept: `The` and `the` stay two tokens (an uncased teacher simply never produces `The`).
- Text is NFC-normalised, so tokens that differ only by Unicode composition become one.
- A piece whose first character the student tokenizer always makes a word of its own (punctuation, CJK
  ideographs) has no continuation form: `.`, `##.`, `▁.` and `Ġ.` are all `.`.
- A lone word boundary (`▁` or `Ġ`) becomes the token `[▁]`, which the student tokenizer never emits.
- Pieces that are not whole UTF-8 characters (byte-level fragments, SentencePiece byte fallback `<0xE2>`),
  pieces with whitespace or control characters (a `▁` inside a SentencePiece piece is a space) and pieces whose
  text would start with `##` are written as bytes, `<0xE2><0x82>` (continuations with `##`).
- Special tokens unify by role: `<s>`/`[CLS]` -> `[CLS]`, `</s>`/`[SEP]` -> `[SEP]`, `<pad>` -> `[PAD]`,
  `<mask>` -> `[MASK]`, `<unk>` -> `[UNK]`.

Ids of one teacher that share a canonical token are its *twins* (`.` and `##.`, `的` and `▁的`): stage one sums
their probabilities before it takes the top-k (`twin_classes`), and stage two maps them to one student token.
The canonical form depends on how the student tokenizer cuts text, so its normaliser and pre-tokenizer are
defined here too (`student_normalizer`, `student_pre_tokenizer`) and the student tokenizer is built from them.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

ROLE_TO_SPECIAL = {
    "cls": "[CLS]",
    "bos": "[CLS]",
    "sep": "[SEP]",
    "eos": "[SEP]",
    "pad": "[PAD]",
    "mask": "[MASK]",
    "unk": "[UNK]",
}
METASPACE = "▁"  # SentencePiece's default word-start marker (Metaspace replacement)
WORD_BOUNDARY = "[▁]"  # the canonical lone word boundary; bracketed so that no text ever spells it
DROPPED = -1  # an id with no student token (dropped by a vocabulary cap)
_BYTE_FALLBACK = re.compile(r"^(<0x[0-9A-Fa-f]{2}>)+$")
BYTE_FORM = re.compile(r"^(<0x[0-9A-F]{2}>)+$")


def _as_bytes(data: bytes) -> str:
    return "".join(f"<0x{b:02X}>" for b in data)


def _text(data: bytes) -> str | None:
    """Decoded NFC text, or None where the byte form must be written instead: not whole UTF-8, whitespace or
    control characters (they cannot stand in vocab.txt), or a leading `##` (it would read as a continuation)."""
    try:
        text = unicodedata.normalize("NFC", data.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in text) or text.startswith("##"):
        return None
    return text


def _piece(continues: bool, data: bytes) -> str:
    """The canonical token of a piece: its text (or byte form), with `##` when it continues a word.

    Text that starts with a character the student tokenizer always makes a word of its own gets no `##`, whatever
    the teacher's spelling said: the student's tokenization starts a new word there, so it never emits `##.`.
    Byte forms keep the flag (they are an encoding, not text), and so does a piece already in byte form, so that
    reading a student vocab.txt back as WordPiece gives every token unchanged.
    """
    text = _text(data)
    if text is None:
        text = _as_bytes(data)
    elif text and not BYTE_FORM.match(text) and char_class(text[0], False) == "alone":
        return text
    return "##" + text if continues else text


def student_normalizer(lowercase: bool):
    """The student tokenizer's normaliser: BERT's, accents kept, lowercasing only when every teacher lowercases."""
    from tokenizers import normalizers

    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
    )


def student_pre_tokenizer():
    """The student tokenizer's pre-tokenizer: BERT's (whitespace, and punctuation as words of its own)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.BertPreTokenizer()


@functools.lru_cache(maxsize=2)
def _student_text_steps(lowercase: bool):
    """The student tokenizer's own normaliser and pre-tokenizer, so that what is decided here about its words
    follows it exactly, Unicode tables of the installed `tokenizers` included (they differ from Python's)."""
    return student_normalizer(lowercase), student_pre_tokenizer()


def _student_words(text: str, lowercase: bool) -> list[str]:
    """The words the student tokenizer cuts `text` into before WordPiece runs."""
    normalizer, pre_tokenizer = _student_text_steps(lowercase)
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


@functools.cache
def char_class(ch: str, lowercase: bool) -> str:
    """What the student tokenizer does with `ch` between letters: "word" (keeps it inside the word), "alone" (makes
    it a word of its own: BERT's punctuation, `$` and `+` included, and the CJK ideographs that
    `handle_chinese_chars` isolates) or "changed" (whitespace, or removed or rewritten by the normaliser, such as
    a control character, or `T` in a lowercasing student). Its normaliser works character by character, so a
    text is one unchanged word exactly when each of its characters is "word" (or it is one "alone" character)."""
    words = _student_words(f"a{ch}a", lowercase)
    return "word" if words == [f"a{ch}a"] else "alone" if words == ["a", ch, "a"] else "changed"


def _walk(node) -> list[dict]:
    """Every component of a pre-tokenizer/decoder/normalizer tree (Sequences flattened)."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("pretokenizers", "decoders", "normalizers"):
        for child in node.get(key) or []:
            found += _walk(child)
    return found


@dataclass(frozen=True)
class Family:
    """A tokenizer's subword convention, read from its tokenizer.json."""

    name: str  # wordpiece | sentencepiece | bytelevel | plain
    marker: str  # the continuation prefix (wordpiece) or word-start replacement (sentencepiece)
    lowercase: bool

    @classmethod
    def of(cls, tokenizer_json: dict) -> Family:
        model = tokenizer_json.get("model") or {}
        parts = _walk(tokenizer_json.get("pre_tokenizer")) + _walk(tokenizer_json.get("decoder"))
        kinds = {part.get("type") for part in parts}
        normalizers = _walk(tokenizer_json.get("normalizer"))
        lowercase = any(
            n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and n.get("lowercase"))
            for n in normalizers
        )
        if model.get("type") == "WordPiece":
            return cls("wordpiece", model.get("continuing_subword_prefix") or "##", lowercase)
        if "ByteLevel" in kinds:
            return cls("bytelevel", "", lowercase)
        if "Metaspace" in kinds or model.get("type") == "Unigram":
            replacement = next((p.get("replacement") for p in parts if p.get("type") == "Metaspace"), None)
            return cls("sentencepiece", replacement or METASPACE, lowercase)
        return cls("plain", "", lowercase)


class Canonicaliser:
    """Maps one teacher's token strings to canonical (WordPiece-style) student tokens."""

    def __init__(self, family: Family):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.family = family
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def __call__(self, token: str) -> str:
        family = self.family
        if family.name == "wordpiece":
            continues = token.startswith(family.marker)
            return _piece(continues, (token[len(family.marker) :] if continues else token).encode())
        if family.name == "sentencepiece":
            if _BYTE_FALLBACK.match(token):
                return token.upper().replace("<0X", "<0x")
            starts = token.startswith(family.marker)
            body = token[len(family.marker) :] if starts else token
            # Metaspace writes every space as the marker, so one inside a piece is a space (`▁▁` is two).
            return self._join(starts, body.replace(family.marker, " ").encode())
        if family.name == "bytelevel":
            if not all(ch in self._byte_of for ch in token):
                return _piece(False, token.encode())  # an added token outside the byte alphabet
            data = bytes(self._byte_of[ch] for ch in token)
            starts = data.startswith(b" ")
            return self._join(starts, data[1:] if starts else data)
        return _piece(False, token.encode())

    @staticmethod
    def _join(starts: bool, body: bytes) -> str:
        if starts and not body:
            return WORD_BOUNDARY
        return _piece(not starts, body)


def canonical_tokens(name: str, tokenizer_json: dict, vocab_size: int, special_ids: dict[str, int]) -> list[str]:
    """The canonical token of each of a teacher's ids `0 .. vocab_size - 1`: named specials by their role, the
    rest through `Canonicaliser`, ids the tokenizer file does not spell as `[<name>:unused<id>]` (a token of their
    own)."""
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    # WordPiece and BPE store {token: id}; Unigram stores [[piece, score], ...] in id order.
    by_id = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {i: p[0] for i, p in enumerate(vocab)}
    for added in tokenizer_json.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
    specials = {token_id: ROLE_TO_SPECIAL[role] for role, token_id in special_ids.items() if role in ROLE_TO_SPECIAL}
    canonicalise = Canonicaliser(Family.of(tokenizer_json))
    canonical = []
    for token_id in range(vocab_size):
        if token_id in specials:
            canonical.append(specials[token_id])
        elif token_id in by_id:
            canonical.append(canonicalise(by_id[token_id]))
        else:
            canonical.append(f"[{name}:unused{token_id}]")
    return canonical


def twin_classes(canonical: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(class of each id [V], representative id of each class [C]): ids with one canonical token form one class,
    classes numbered in the order of their smallest id, which represents them."""
    first: dict[str, int] = {}
    classes = np.empty(len(canonical), dtype=np.int64)
    for token_id, token in enumerate(canonical):
        classes[token_id] = first.setdefault(token, len(first))
    representatives = np.full(len(first), -1, dtype=np.int64)
    for token_id in range(len(canonical) - 1, -1, -1):
        representatives[classes[token_id]] = token_id
    return classes, representatives
