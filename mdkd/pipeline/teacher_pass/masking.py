"""BERT-style masking of tokenised windows.

The random choices for a window depend only on (seed, doc_id, window, copy): not on the rank that processes it,
the batch it lands in, the worker process that prepared it, or whether the run was resumed. Two teachers that
share a tokenizer therefore see exactly the same masked input, and a resumed run writes the same bytes as an
uninterrupted one.

Like Google's BERT, each window gets `max(1, round(n * probability))` predicted positions chosen among its
`n` ordinary tokens (special tokens are never chosen), so every window teaches something and the rate is exact.
Each chosen position becomes the mask token, a random ordinary token, or stays as it is (80/10/10 by default).

A unit's windows are masked together (`Masker.mask`): what each window draws still comes from its own generator,
seeded by its identity, so the bytes are those of masking it alone; everything around the draws is done for the
whole unit at once, and the generators are started without NumPy's per-seed set-up (`WindowGenerators`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mdkd.pipeline.teacher_pass.config import MaskingConfig


def window_seed(seed: int, doc_id: str, window: int, copy: int) -> int:
    """A 64-bit seed from the window's identity (stable across processes, unlike Python's hash())."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}\0{window}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# NumPy's SeedSequence (numpy/random/bit_generator.pyx) and PCG64 seeding constants. Both algorithms are fixed by
# NumPy's stream-compatibility policy (NEP 19); tests/test_masking.py checks these states against NumPy's own.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MASK32, _MASK128 = (1 << 32) - 1, (1 << 128) - 1


def _entropy_words(seed: int, stream: int | None) -> list[int]:
    """The 32-bit words SeedSequence makes of `seed` (or of `[seed, stream]`): an int is cut into words from the
    lowest, as many as it needs, so a seed below 2**32 gives one word, not two."""
    words = [seed & _MASK32] + ([seed >> 32] if seed >> 32 else [])
    return words + ([stream] if stream is not None else [])


def pcg64_starts(seeds: list[int], stream: int | None = None) -> list[tuple[int, int]]:
    """(state, increment) that `np.random.default_rng(seed)` (or `default_rng([seed, stream])`) starts from, for
    every seed at once: SeedSequence's hashing done on arrays of all the seeds' words, then PCG64's seeding."""
    words = np.zeros((len(seeds), 4), dtype=np.uint32)
    for row, seed in enumerate(seeds):
        entropy = _entropy_words(seed, stream)
        words[row, : len(entropy)] = entropy  # a missing word hashes as 0 does (SeedSequence.mix_entropy)
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = hash_const * _MULT_A & _MASK32
        value = value * np.uint32(hash_const)
        return value ^ (value >> np.uint32(_XSHIFT))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(_XSHIFT))

    pool = [hashmix(words[:, i]) for i in range(4)]
    for source in range(4):
        for target in range(4):
            if source != target:
                pool[target] = mix(pool[target], hashmix(pool[source]))
    # generate_state(4, np.uint64): eight 32-bit words, cycling over the pool, read as four little-endian uint64s.
    hash_const = _INIT_B
    state_words = []
    for i in range(8):
        value = pool[i % 4] ^ np.uint32(hash_const)
        hash_const = hash_const * _MULT_B & _MASK32
        value = value * np.uint32(hash_const)
        state_words.append((value ^ (value >> np.uint32(_XSHIFT))).astype(np.uint64))
    halves = [(state_words[2 * i] | (state_words[2 * i + 1] << np.uint64(32))).tolist() for i in range(4)]
    starts = []
    for high_state, low_state, high_sequence, low_sequence in zip(*halves, strict=True):
        # pcg_setseq_128_srandom_r: state 0, step, add the initial state, step.
        increment = ((high_sequence << 64 | low_sequence) << 1 | 1) & _MASK128
        state = (increment + (high_state << 64 | low_state)) & _MASK128
        starts.append(((state * _PCG64_MULTIPLIER + increment) & _MASK128, increment))
    return starts


class WindowGenerators:
    """One NumPy Generator moved to where `np.random.default_rng(seed)` would start, seed after seed: the same
    draws, without building a SeedSequence, a bit generator and a Generator for every window."""

    def __init__(self):
        self._bits = np.random.PCG64()
        self._generator = np.random.Generator(self._bits)

    def at(self, start: tuple[int, int]) -> np.random.Generator:
        state, increment = start
        self._bits.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": increment},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._generator


@dataclass(frozen=True)
class MaskedRows:
    """Rows after masking, flat: row i's masked positions are `positions[position_offsets[i]:position_offsets[i+1]]`
    (ascending, indices into the row), with the original ids there in `labels`."""

    input_ids: np.ndarray  # int32, every row's input after masking, concatenated (the rows' offsets are the input's)
    positions: np.ndarray  # int32
    position_offsets: np.ndarray  # int64 [rows + 1]
    labels: np.ndarray  # int32


class Masker:
    """Masks windows of one tokenizer's ids with the configured rates."""

    def __init__(self, settings: MaskingConfig, mask_token_id: int, special_ids: set[int], vocab_size: int):
        self.settings = settings
        self.mask_token_id = mask_token_id
        # Random replacements are drawn from ordinary tokens only: a random [CLS] mid-sentence teaches nothing.
        self.replacement_ids = np.array([i for i in range(vocab_size) if i not in special_ids], dtype=np.int32)

    def mask(self, ids: np.ndarray, special: np.ndarray, offsets: np.ndarray, seeds: list[int]) -> MaskedRows:
        """Mask rows given flat: row i is `ids[offsets[i]:offsets[i+1]]`, `special` flags its special tokens,
        and `seeds[i]` (its `window_seed`) seeds its draws.

        Each row draws from its own generator, in this order: its positions (a choice without replacement among
        its ordinary tokens), one uniform per position (mask, random or keep, for the positions in ascending
        order), and one replacement per position, exactly as `np.random.default_rng(seed)` would."""
        ids = np.asarray(ids, dtype=np.int32)
        rows = len(seeds)
        row_of_token = np.repeat(np.arange(rows), np.diff(offsets))
        candidates = np.flatnonzero(np.asarray(special) == 0)  # grouped by row, ascending
        per_row = np.bincount(row_of_token[candidates], minlength=rows)
        # round() of a float rounds half to even, as np.rint does.
        counts = np.where(per_row > 0, np.maximum(1, np.rint(per_row * self.settings.probability)), 0).astype(np.int64)
        chosen, draws, replacements = [], [], []
        generators = WindowGenerators()
        for start, available, count in zip(pcg64_starts(seeds), per_row.tolist(), counts.tolist(), strict=True):
            if count == 0:
                continue
            generator = generators.at(start)
            chosen.append(generator.choice(available, size=count, replace=False))
            draws.append(generator.random(count))
            # choice(replacement_ids, size) draws integers(0, len(replacement_ids), size) and indexes with them.
            replacements.append(generator.integers(0, len(self.replacement_ids), size=count))
        position_offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(counts, out=position_offsets[1:])
        if not chosen:
            empty = np.zeros(0, dtype=np.int32)
            return MaskedRows(ids.copy(), empty, position_offsets, empty)
        first_candidate = np.cumsum(per_row) - per_row
        # Rows hold disjoint, increasing ranges of `ids`, so one sort orders each row's positions within the row.
        where = np.sort(candidates[np.repeat(first_candidate, counts) + np.concatenate(chosen)])
        draw = np.concatenate(draws)
        replacement = self.replacement_ids[np.concatenate(replacements)]
        masked = ids.copy()
        to_mask = draw < self.settings.mask
        to_random = (draw >= self.settings.mask) & (draw < self.settings.mask + self.settings.random)
        masked[where[to_mask]] = self.mask_token_id
        masked[where[to_random]] = replacement[to_random]
        positions = (where - np.repeat(np.asarray(offsets[:-1]), counts)).astype(np.int32)
        return MaskedRows(masked, positions, position_offsets, ids[where])
