"""Many NumPy generators, one per seed, started as `np.random.default_rng` starts them but without its per-seed set-up.

Both stages draw from a generator seeded by an identity (stage one: a window's masking and tail draws; stage two:
each training example's language and teacher), so that what is drawn depends on that identity alone. Building a
SeedSequence, a PCG64 and a Generator costs tens of microseconds each time; `pcg64_starts` computes the starting
states of many seeds at once, and one `SeededGenerator` is moved to each in turn.
"""

from __future__ import annotations

import numpy as np

# NumPy's SeedSequence (numpy/random/bit_generator.pyx) and PCG64 seeding constants. Both algorithms are fixed by
# NumPy's stream-compatibility policy (NEP 19); tests/test_masking.py checks these states against NumPy's own.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MASK32, _MASK128 = (1 << 32) - 1, (1 << 128) - 1


def _entropy_words(entropy: list[int]) -> list[int]:
    """The 32-bit words SeedSequence makes of a list of non-negative ints: each int cut into words from the lowest,
    as many as it needs (at least one), so an int below 2**32 gives one word, not two."""
    words = []
    for value in entropy:
        if value < 0:
            raise ValueError(f"a seed must not be negative, got {value}")
        words.append(value & _MASK32)
        while value >> 32:
            value >>= 32
            words.append(value & _MASK32)
    return words


def pcg64_starts(entropies: list[list[int]]) -> list[tuple[int, int]]:
    """(state, increment) that `np.random.default_rng(entropy)` starts from, for every entropy (a list of up to four
    32-bit words' worth of non-negative ints, e.g. [seed] or [seed, index]) at once: SeedSequence's hashing done on
    arrays of all their words, then PCG64's seeding."""
    words = np.zeros((len(entropies), 4), dtype=np.uint32)
    for row, entropy in enumerate(entropies):
        entropy_words = _entropy_words(entropy)
        if len(entropy_words) > 4:
            raise ValueError(f"entropy {entropy} is more than four 32-bit words")
        words[row, : len(entropy_words)] = entropy_words  # a missing word hashes as 0 does (SeedSequence.mix_entropy)
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


class SeededGenerator:
    """One NumPy Generator moved to where `np.random.default_rng(entropy)` would start (`at`, with a start from
    `pcg64_starts`), seed after seed: the same draws, without building a SeedSequence, a bit generator and a
    Generator for every seed."""

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
