"""The merged student vocabulary and the id maps from each teacher into it, built from the cache alone.

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

Several teacher ids can map to one student id (the teacher's own `the` and `▁the`, say); their probabilities are
summed in the soft targets. With a size cap, the least frequent tokens of the cached inputs are dropped: they map
to `[UNK]` in inputs and labels and are removed (renormalised) from soft targets.

`why_never_emitted` tells from a token's string whether the student tokenizer can ever emit it, and
`teacher_token_shares` measures how much of one teacher's inputs and top-k mass lands on shared, never-emitted
and dropped student tokens.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdkd.pipeline.cache.manifest import ShardEntry, special_token_ids
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import ShardRows
from mdkd.pipeline.distill.student_tokenizer import MAX_WORD_CHARS, STUDENT_SPECIALS, student_tokenizer
from mdkd.pipeline.errors import UserError

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
DROPPED = -1
_BYTE_FALLBACK = re.compile(r"^(<0x[0-9A-Fa-f]{2}>)+$")
_BYTE_FORM = re.compile(r"^(<0x[0-9A-F]{2}>)+$")


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
    elif text and not _BYTE_FORM.match(text) and _char_class(text[0], False) == "alone":
        return text
    return "##" + text if continues else text


@functools.lru_cache(maxsize=2)
def _student_text_steps(lowercase: bool):
    """The student tokenizer's own normaliser and pre-tokenizer, so that what is decided here about its words
    follows it exactly, Unicode tables of the installed `tokenizers` included (they differ from Python's)."""
    backend = student_tokenizer(list(STUDENT_SPECIALS), lowercase).backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer


def _student_words(text: str, lowercase: bool) -> list[str]:
    """The words the student tokenizer cuts `text` into before WordPiece runs."""
    normalizer, pre_tokenizer = _student_text_steps(lowercase)
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


@functools.cache
def _char_class(ch: str, lowercase: bool) -> str:
    """What the student tokenizer does with `ch` between letters: "word" (keeps it inside the word), "alone" (makes
    it a word of its own: BERT's punctuation, `$` and `+` included, and the CJK ideographs that
    `handle_chinese_chars` isolates) or "changed" (whitespace, or removed or rewritten by the normaliser, such as
    a control character, or `T` in a lowercasing student). Its normaliser works character by character, so a
    text is one unchanged word exactly when each of its characters is "word" (or it is one "alone" character)."""
    words = _student_words(f"a{ch}a", lowercase)
    return "word" if words == [f"a{ch}a"] else "alone" if words == ["a", ch, "a"] else "changed"


def why_never_emitted(token: str, lowercase: bool = False) -> str | None:
    """None if the student tokenizer can emit `token` (a canonical token) for some text, else why it never can.

    Decided from the string alone, by asking the student's own normaliser and pre-tokenizer whether the token's
    text survives as one unchanged word: then a word-start token is emitted for the text that is the token itself,
    and a continuation `##x` after a word start (`ax`), as WordPiece takes the longest piece that fits. Reasons:
    "word boundary" (`[▁]`), "bytes" (a byte form such as `<0xE2>`), "too long" (the word would exceed
    MAX_WORD_CHARS and become [UNK]), "split or normalised" (text the student's pre-tokenization cuts, such as
    `'s`, `...` or `##.`, or that its normaliser changes or removes, such as `The` in a lowercasing student).
    `lowercase` is the student tokenizer's setting (`Alignment.lowercase`).
    """
    if token in STUDENT_SPECIALS:
        return None  # added tokens of the student tokenizer: matched in text, and placed by its templates
    if token == WORD_BOUNDARY:
        return "word boundary"
    continues = token.startswith("##")
    body = token[2:] if continues else token
    if _BYTE_FORM.match(body):
        return "bytes"
    if len(body) + (1 if continues else 0) > MAX_WORD_CHARS:  # a continuation follows at least one character
        return "too long"
    classes = [_char_class(ch, lowercase) for ch in body]
    if not body or not (all(c == "word" for c in classes) or (not continues and classes == ["alone"])):
        return "split or normalised"
    return None


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


@dataclass
class TeacherVocabulary:
    """One teacher's tokens (by id) and their canonical forms, as recorded in the cache."""

    name: str
    family: Family
    canonical: list[str]

    @classmethod
    def from_cache(cls, cache: CacheReader, name: str) -> TeacherVocabulary:
        """A teacher as stage one recorded it: its tokenizer copy and manifest entry."""
        entry = cache.teacher(name)
        return cls.from_tokenizer_file(name, cache.tokenizer_file(name), entry.vocab_size, entry.special_token_ids)

    @classmethod
    def from_tokenizer(cls, name: str, folder: Path, tokenizer) -> TeacherVocabulary:
        """Any saved fast tokenizer (a student, an outside model), to compare its tokens with a teacher's."""
        return cls.from_tokenizer_file(name, folder / "tokenizer.json", len(tokenizer), special_token_ids(tokenizer))

    @classmethod
    def from_tokenizer_file(
        cls, name: str, path: Path, vocab_size: int, special_ids: dict[str, int]
    ) -> TeacherVocabulary:
        try:
            tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the tokenizer of {name} at {path}: {exc}") from None
        family = Family.of(tokenizer_json)
        vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
        # WordPiece and BPE store {token: id}; Unigram stores [[piece, score], ...] in id order.
        by_id = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {i: p[0] for i, p in enumerate(vocab)}
        for added in tokenizer_json.get("added_tokens") or []:
            by_id[added["id"]] = added["content"]
        specials = {
            token_id: ROLE_TO_SPECIAL[role] for role, token_id in special_ids.items() if role in ROLE_TO_SPECIAL
        }
        canonicalise = Canonicaliser(family)
        canonical = []
        for token_id in range(vocab_size):
            if token_id in specials:
                canonical.append(specials[token_id])
            elif token_id in by_id:
                canonical.append(canonicalise(by_id[token_id]))
            else:
                canonical.append(f"[{name}:unused{token_id}]")
        return cls(name, family, canonical)


@dataclass
class Alignment:
    """The student vocabulary and, per teacher, a plain int32 array: teacher id -> student id (-1: dropped)."""

    tokens: list[str]
    id_maps: dict[str, np.ndarray]
    lowercase: bool  # the student tokenizer lowercases (only when every teacher of the run does)
    stats: dict  # what stats.json reports (size, overlaps, never-emitted tokens; `lowercase` too)

    @property
    def unk_id(self) -> int:
        return STUDENT_SPECIALS.index("[UNK]")

    def input_map(self, teacher: str) -> np.ndarray:
        """The id map for inputs and labels: a dropped token becomes [UNK]."""
        ids = self.id_maps[teacher]
        return np.where(ids == DROPPED, self.unk_id, ids).astype(np.int64)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("".join(token + "\n" for token in self.tokens), encoding="utf-8")
        for name, ids in self.id_maps.items():
            np.save(folder / f"idmap-{name}.npy", ids)
        (folder / "stats.json").write_text(
            json.dumps(self.stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @staticmethod
    def saved_in(folder: Path) -> bool:
        """Whether `save` has finished in `folder` (stats.json is written last)."""
        return (folder / "stats.json").exists()

    @classmethod
    def load(cls, folder: Path, teachers: list[str]) -> Alignment:
        tokens = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        id_maps = {name: np.load(folder / f"idmap-{name}.npy") for name in teachers}
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        return cls(tokens, id_maps, stats["lowercase"], stats)


def build_alignment(
    vocabularies: list[TeacherVocabulary], frequencies: dict[str, Counter] | None = None, max_size: int | None = None
) -> Alignment:
    """Union of the teachers' canonical tokens (specials first, then teachers in order, ids ascending).

    With `max_size`, keep the specials and the tokens most frequent in `frequencies` (canonical-token counts per
    teacher from the cached inputs); ties keep the union order, so the result is deterministic.
    """
    union = list(STUDENT_SPECIALS)
    seen = set(union)
    for vocabulary in vocabularies:
        for token in vocabulary.canonical:
            if token not in seen:
                seen.add(token)
                union.append(token)
    kept = union
    if max_size is not None and max_size < len(union):
        if max_size < len(STUDENT_SPECIALS) + 1:
            raise UserError(
                f"vocab.max_size {max_size} leaves no room beside the {len(STUDENT_SPECIALS)} special tokens"
            )
        total = Counter()
        for counts in (frequencies or {}).values():
            total.update(counts)
        order = {token: index for index, token in enumerate(union)}
        ranked = sorted(union[len(STUDENT_SPECIALS) :], key=lambda token: (-total[token], order[token]))
        keep = set(ranked[: max_size - len(STUDENT_SPECIALS)])
        kept = list(STUDENT_SPECIALS) + [token for token in union[len(STUDENT_SPECIALS) :] if token in keep]
    student_id = {token: index for index, token in enumerate(kept)}
    id_maps = {
        v.name: np.array([student_id.get(token, DROPPED) for token in v.canonical], dtype=np.int32)
        for v in vocabularies
    }
    lowercase = all(v.family.lowercase for v in vocabularies)  # the student tokenizer lowercases only then
    return Alignment(kept, id_maps, lowercase, _stats(vocabularies, union, kept, id_maps, lowercase))


def _stats(
    vocabularies: list[TeacherVocabulary], union: list[str], kept: list[str], id_maps: dict, lowercase: bool
) -> dict:
    sets = {v.name: set(v.canonical) for v in vocabularies}
    overlap = {a: {b: len(sets[a] & sets[b]) for b in sets} for a in sets}
    reasons = Counter(why_never_emitted(token, lowercase) for token in kept)
    del reasons[None]
    return {
        "size": len(kept),
        "union_size": len(union),
        "lowercase": lowercase,
        "never_emitted": dict(sorted(reasons.items())),
        "teachers": {
            v.name: {
                "family": v.family.name,
                "lowercase": v.family.lowercase,
                "vocab_size": len(v.canonical),
                "distinct_canonical_tokens": len(sets[v.name]),
                "tokens_dropped": int((id_maps[v.name] == DROPPED).sum()),
            }
            for v in vocabularies
        },
        "shared_tokens": overlap,
    }


@dataclass
class TokenTally:
    """What one teacher's cached shards hold, by teacher id: how often each id occurs in the original (unmasked)
    inputs, and how much of its top-k probability (temperature 1) falls on each id, over `positions` positions."""

    inputs: np.ndarray  # [teacher vocab] counts
    topk_mass: np.ndarray  # [teacher vocab] summed probabilities
    positions: int

    @classmethod
    def from_cache(cls, cache: CacheReader, shards: list[ShardEntry], vocab_size: int) -> TokenTally:
        """One pass over the shards; memory is two vocabulary-sized arrays, however large the cache."""
        tally = cls(np.zeros(vocab_size), np.zeros(vocab_size), 0)
        for shard in shards:
            tally.add(cache.rows(shard))
        return tally

    def add(self, rows: ShardRows) -> None:
        """Count one decoded shard in."""
        size = len(self.inputs)
        self.inputs += np.bincount(rows.original_inputs(), minlength=size)[:size]
        probs = np.exp(rows.topk_logprobs.astype(np.float64)).ravel()
        self.topk_mass += np.bincount(rows.topk_ids.ravel(), weights=probs, minlength=size)[:size]
        self.positions += rows.topk_ids.shape[0]

    def canonical_counts(self, canonical: list[str]) -> Counter:
        """Input counts by canonical token (several teacher ids may share one): what a vocabulary cap ranks by."""
        total: Counter = Counter()
        for token_id in np.flatnonzero(self.inputs):
            total[canonical[token_id]] += int(self.inputs[token_id])
        return total


def map_by_canonical(source: TeacherVocabulary, target: TeacherVocabulary) -> np.ndarray:
    """source id -> target id of the same canonical token (-1 when the target has no such token)."""
    target_id: dict[str, int] = {}
    for index, token in enumerate(target.canonical):
        target_id.setdefault(token, index)
    return np.array([target_id.get(token, DROPPED) for token in source.canonical], dtype=np.int32)


def teacher_token_shares(alignment: Alignment, teacher: str, tally: TokenTally) -> dict:
    """Where one teacher's inputs and predictions land in the student vocabulary, as shares.

    Returns, for the inputs (share of tokens) and for the top-k (share of the probability mass the top-k holds),
    the share that lands on:

    - `shared`: ordinary student tokens some other teacher of the alignment also maps to;
    - `never_emitted`: student tokens the student tokenizer never emits (`why_never_emitted`);
    - `dropped`: no student token (ids dropped by the vocabulary cap);
    - `special`: the special tokens, counted apart because every teacher shares them by construction.

    A token can be both shared and never emitted (two teachers' `...`), so the shares need not sum to 1. Also
    returned: `input_tokens` and `positions` (the totals), `topk_mass`, the mean top-k mass per position, and
    `mass_dropped`, the mean top-k probability per position that falls on dropped ids.
    """
    id_map = alignment.id_maps[teacher]
    if tally.inputs.shape != id_map.shape or tally.topk_mass.shape != id_map.shape:
        raise ValueError(
            f"expected tallies over the teacher's {len(id_map)} ids; got {tally.inputs.shape} and "
            f"{tally.topk_mass.shape}"
        )
    specials = len(STUDENT_SPECIALS)
    never = np.array(
        [why_never_emitted(token, alignment.lowercase) is not None for token in alignment.tokens], dtype=bool
    )
    shared = np.zeros(len(alignment.tokens), dtype=bool)
    for name, other in alignment.id_maps.items():
        if name != teacher:
            shared[other[other != DROPPED]] = True
    shared[:specials] = False
    kept = id_map != DROPPED
    student = np.where(kept, id_map, 0)
    classes = {
        "shared": kept & shared[student],
        "never_emitted": kept & never[student],
        "dropped": ~kept,
        "special": kept & (student < specials),
    }
    inputs, mass, positions = tally.inputs.sum(), tally.topk_mass.sum(), max(tally.positions, 1)
    return {
        "input_tokens": int(inputs),
        "positions": tally.positions,
        "topk_mass": float(mass / positions),
        "mass_dropped": float(tally.topk_mass[~kept].sum() / positions),
        "input": {
            name: float(tally.inputs[member].sum() / inputs) if inputs else 0.0 for name, member in classes.items()
        },
        "topk": {
            name: float(tally.topk_mass[member].sum() / mass) if mass else 0.0 for name, member in classes.items()
        },
    }
