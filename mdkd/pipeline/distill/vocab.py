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
- A lone word boundary (`▁` or `Ġ`) becomes the token `▁`.
- Pieces that are not whole UTF-8 characters (byte-level fragments, SentencePiece byte fallback `<0xE2>`) and
  pieces with whitespace or control characters are written as bytes, `<0xE2><0x82>` (continuations with `##`).
- Special tokens unify by role: `<s>`/`[CLS]` -> `[CLS]`, `</s>`/`[SEP]` -> `[SEP]`, `<pad>` -> `[PAD]`,
  `<mask>` -> `[MASK]`, `<unk>` -> `[UNK]`.

Several teacher ids can map to one student id (the teacher's own `the` and `▁the`, say); their probabilities are
summed in the soft targets. With a size cap, the least frequent tokens of the cached inputs are dropped: they map
to `[UNK]` in inputs and labels and are removed (renormalised) from soft targets.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdkd.pipeline.errors import UserError

STUDENT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROLE_TO_SPECIAL = {"cls": "[CLS]", "bos": "[CLS]", "sep": "[SEP]", "eos": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
WORD_BOUNDARY = "▁"
DROPPED = -1
_BYTE_FALLBACK = re.compile(r"^(<0x[0-9A-Fa-f]{2}>)+$")


def _as_bytes(data: bytes) -> str:
    return "".join(f"<0x{b:02X}>" for b in data)


def _text_or_bytes(data: bytes) -> str:
    """Decoded NFC text, or the byte form when it is not whole UTF-8 or holds whitespace or control characters."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _as_bytes(data)
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in text):
        return _as_bytes(data)
    return unicodedata.normalize("NFC", text)


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
    def of(cls, tokenizer_json: dict) -> "Family":
        model = tokenizer_json.get("model") or {}
        parts = _walk(tokenizer_json.get("pre_tokenizer")) + _walk(tokenizer_json.get("decoder"))
        kinds = {part.get("type") for part in parts}
        normalizers = _walk(tokenizer_json.get("normalizer"))
        lowercase = any(n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and n.get("lowercase")) for n in normalizers)
        if model.get("type") == "WordPiece":
            return cls("wordpiece", model.get("continuing_subword_prefix") or "##", lowercase)
        if "ByteLevel" in kinds:
            return cls("bytelevel", "", lowercase)
        if "Metaspace" in kinds or model.get("type") == "Unigram":
            replacement = next((p.get("replacement") for p in parts if p.get("type") == "Metaspace"), None)
            return cls("sentencepiece", replacement or WORD_BOUNDARY, lowercase)
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
            if token.startswith(family.marker):
                return "##" + _text_or_bytes(token[len(family.marker):].encode())
            return _text_or_bytes(token.encode())
        if family.name == "sentencepiece":
            if _BYTE_FALLBACK.match(token):
                return token.upper().replace("<0X", "<0x")
            starts = token.startswith(family.marker)
            body = token[len(family.marker):] if starts else token
            return self._join(starts, body.encode())
        if family.name == "bytelevel":
            if not all(ch in self._byte_of for ch in token):
                return _text_or_bytes(token.encode())  # an added token outside the byte alphabet
            data = bytes(self._byte_of[ch] for ch in token)
            starts = data.startswith(b" ")
            return self._join(starts, data[1:] if starts else data)
        return _text_or_bytes(token.encode())

    @staticmethod
    def _join(starts: bool, body: bytes) -> str:
        if starts and not body:
            return WORD_BOUNDARY
        text = _text_or_bytes(body)
        return text if starts else "##" + text


@dataclass
class TeacherVocabulary:
    """One teacher's tokens (by id) and their canonical forms, as recorded in the cache."""

    name: str
    family: Family
    canonical: list[str]

    @classmethod
    def from_cache(cls, cache_dir: Path, name: str, entry: dict) -> "TeacherVocabulary":
        """A teacher as stage one recorded it: its tokenizer copy and manifest entry."""
        return cls.from_tokenizer_file(
            name, cache_dir / entry["tokenizer_dir"] / "tokenizer.json", entry["vocab_size"], entry["special_token_ids"]
        )

    @classmethod
    def from_tokenizer(cls, name: str, folder: Path, tokenizer) -> "TeacherVocabulary":
        """Any saved fast tokenizer (a student, an outside model), to compare its tokens with a teacher's."""
        from mdkd.pipeline.teacher_pass.teachers import special_token_ids

        return cls.from_tokenizer_file(name, folder / "tokenizer.json", len(tokenizer), special_token_ids(tokenizer))

    @classmethod
    def from_tokenizer_file(cls, name: str, path: Path, vocab_size: int, special_ids: dict[str, int]) -> "TeacherVocabulary":
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
        specials = {token_id: ROLE_TO_SPECIAL[role] for role, token_id in special_ids.items() if role in ROLE_TO_SPECIAL}
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
    stats: dict

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
        (folder / "stats.json").write_text(json.dumps(self.stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, teachers: list[str]) -> "Alignment":
        tokens = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        id_maps = {name: np.load(folder / f"idmap-{name}.npy") for name in teachers}
        return cls(tokens, id_maps, json.loads((folder / "stats.json").read_text(encoding="utf-8")))


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
            raise UserError(f"vocab.max_size {max_size} leaves no room beside the {len(STUDENT_SPECIALS)} special tokens")
        total = Counter()
        for counts in (frequencies or {}).values():
            total.update(counts)
        order = {token: index for index, token in enumerate(union)}
        ranked = sorted(union[len(STUDENT_SPECIALS):], key=lambda token: (-total[token], order[token]))
        keep = set(ranked[: max_size - len(STUDENT_SPECIALS)])
        kept = list(STUDENT_SPECIALS) + [token for token in union[len(STUDENT_SPECIALS):] if token in keep]
    student_id = {token: index for index, token in enumerate(kept)}
    id_maps = {
        v.name: np.array([student_id.get(token, DROPPED) for token in v.canonical], dtype=np.int32) for v in vocabularies
    }
    return Alignment(kept, id_maps, _stats(vocabularies, union, kept, id_maps))


def _stats(vocabularies: list[TeacherVocabulary], union: list[str], kept: list[str], id_maps: dict) -> dict:
    sets = {v.name: set(v.canonical) for v in vocabularies}
    overlap = {a: {b: len(sets[a] & sets[b]) for b in sets} for a in sets}
    return {
        "size": len(kept),
        "union_size": len(union),
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


def count_cached_tokens(cache_dir: Path, shards: list[dict], canonical: list[str]) -> Counter:
    """Canonical-token counts over the original (unmasked) inputs of `shards` of one teacher."""
    import pyarrow.compute as pc

    from mdkd.pipeline.cache.shards import read_shard

    counts = np.zeros(len(canonical), dtype=np.int64)
    for shard in shards:
        table = read_shard(cache_dir / shard["path"], ["input_ids", "positions", "labels"])
        ids = pc.list_flatten(table.column("input_ids")).to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(pc.list_value_length(table.column("input_ids")).to_numpy())[:-1]])
        counts_per_row = pc.list_value_length(table.column("positions")).to_numpy()
        positions = pc.list_flatten(table.column("positions")).to_numpy() + np.repeat(starts, counts_per_row)
        ids[positions] = pc.list_flatten(table.column("labels")).to_numpy()
        counts += np.bincount(ids, minlength=len(canonical))[: len(canonical)]
    total: Counter = Counter()
    for token_id in np.flatnonzero(counts):
        total[canonical[token_id]] += int(counts[token_id])
    return total


def mass_dropped(cache_dir: Path, shards: list[dict], id_map: np.ndarray, top_k: int) -> float:
    """Mean teacher probability (within the top-k) per cached position that falls on dropped tokens."""
    import pyarrow.compute as pc

    from mdkd.pipeline.cache.shards import read_shard

    lost = positions = 0.0
    for shard in shards:
        table = read_shard(cache_dir / shard["path"], ["topk_ids", "topk_logprobs"])
        ids = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy().reshape(-1, top_k)
        logprobs = pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy().reshape(-1, top_k)
        lost += float((np.exp(logprobs.astype(np.float64)) * (id_map[ids] == DROPPED)).sum())
        positions += ids.shape[0]
    return lost / max(positions, 1)


def map_by_canonical(source: TeacherVocabulary, target: TeacherVocabulary) -> np.ndarray:
    """source id -> target id of the same canonical token (-1 when the target has no such token)."""
    target_id: dict[str, int] = {}
    for index, token in enumerate(target.canonical):
        target_id.setdefault(token, index)
    return np.array([target_id.get(token, DROPPED) for token in source.canonical], dtype=np.int32)
