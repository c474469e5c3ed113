"""The merged student vocabulary and the id maps from each teacher into it, built from the cache alone.

Every teacher token is brought to its canonical (WordPiece-style) form first: mdkd/pipeline/canonical.py holds the
rules, shared with stage one, which sums a teacher's twins (ids with one canonical token) before its top-k. The
student vocabulary is the union of the teachers' canonical tokens.

Several teacher ids can map to one student id (the teacher's own `the` and `▁the`, say); their probabilities are
summed in the soft targets. With a size cap, the least frequent tokens of the cached inputs are dropped: they map
to `[UNK]` in inputs and labels; docs/training.md says what becomes of their mass in each loss.

`why_never_emitted` tells from a token's string whether the student tokenizer can ever emit it, and
`teacher_token_shares` measures how much of one teacher's inputs and top-k mass lands on shared, never-emitted
and dropped student tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdkd.pipeline.cache.manifest import ShardEntry, special_token_ids
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import ShardRows
from mdkd.pipeline.canonical import BYTE_FORM, DROPPED, WORD_BOUNDARY, Family, canonical_tokens, char_class
from mdkd.pipeline.distill.student_tokenizer import MAX_WORD_CHARS, STUDENT_SPECIALS
from mdkd.pipeline.errors import UserError


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
    if BYTE_FORM.match(body):
        return "bytes"
    if len(body) + (1 if continues else 0) > MAX_WORD_CHARS:  # a continuation follows at least one character
        return "too long"
    classes = [char_class(ch, lowercase) for ch in body]
    if not body or not (all(c == "word" for c in classes) or (not continues and classes == ["alone"])):
        return "split or normalised"
    return None


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
        return cls(name, family, canonical_tokens(name, tokenizer_json, vocab_size, special_ids))


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

    def support(self, teacher: str) -> np.ndarray:
        """[student vocabulary] bool: the student tokens this teacher can emit, its tokens' images through
        `input_map` (so [UNK] stands for the ids a vocabulary cap dropped). The `support` loss gives every other
        token teacher mass 0."""
        mask = np.zeros(len(self.tokens), dtype=bool)
        mask[self.input_map(teacher)] = True
        return mask

    def support_target_map(self, teacher: str) -> np.ndarray:
        """The id map for the `support` loss's targets: the teacher's ids as its tokens (-1: dropped). When a cap
        dropped some, [UNK] stands for all of them and for the teacher's own unknown token, a mass the top-k cannot
        give whole; so its top-k entries go to the rest bucket (which holds [UNK]) instead of a bucket of their own."""
        ids = self.id_maps[teacher].astype(np.int64)
        if (ids == DROPPED).any():
            ids = np.where(ids == self.unk_id, DROPPED, ids)
        return ids

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


def map_by_canonical(source: TeacherVocabulary, target: list[str]) -> np.ndarray:
    """source id -> id of the same canonical token in `target` (canonical tokens by id; its first id where several
    share one; -1 when it has no such token)."""
    target_id: dict[str, int] = {}
    for index, token in enumerate(target):
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
