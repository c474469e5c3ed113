"""Masking: exact rate, the 80/10/10 split, labels, special tokens, determinism, and the same draws as masking
each window with its own `np.random.default_rng` (the bytes caches were written with)."""

from __future__ import annotations

import numpy as np
import pytest

from mdkd.pipeline.seeding import pcg64_starts
from mdkd.pipeline.teacher_pass.config import MaskingConfig
from mdkd.pipeline.teacher_pass.masking import Masker, window_seed

MASK_ID, SPECIALS, VOCAB = 4, {0, 1, 2, 3, 4}, 1000


def _window(rng: np.random.Generator, length: int):
    ids = np.concatenate([[2], rng.integers(5, VOCAB, length - 2), [3]]).astype(np.int32)
    special = np.zeros(length, dtype=int)
    special[[0, -1]] = 1
    return ids, special


def _mask_each(masker: Masker, windows: list[tuple[np.ndarray, np.ndarray]], seeds: list[int]):
    """Mask windows together; return (input, positions, labels) per window."""
    offsets = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in windows], out=offsets[1:])
    out = masker.mask(np.concatenate([w[0] for w in windows]), np.concatenate([w[1] for w in windows]), offsets, seeds)
    p = out.position_offsets
    return [
        (out.input_ids[offsets[i] : offsets[i + 1]], out.positions[p[i] : p[i + 1]], out.labels[p[i] : p[i + 1]])
        for i in range(len(windows))
    ]


def _one_window_at_a_time(masker: Masker, ids, special, seed: int):
    """Masking as stage one did it before units were masked together: a fresh generator per window."""
    settings = masker.settings
    original = np.asarray(ids, dtype=np.int32)
    candidates = np.flatnonzero(np.asarray(special) == 0)
    count = max(1, int(round(len(candidates) * settings.probability))) if len(candidates) else 0
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int32)
    draws = rng.random(count)
    replacements = rng.choice(masker.replacement_ids, size=count)
    masked = original.copy()
    to_mask = draws < settings.mask
    to_random = (draws >= settings.mask) & (draws < settings.mask + settings.random)
    masked[positions[to_mask]] = masker.mask_token_id
    masked[positions[to_random]] = replacements[to_random]
    return masked, positions, original[positions]


def test_rate_split_and_labels_over_many_windows():
    masker = Masker(MaskingConfig(), MASK_ID, SPECIALS, VOCAB)
    rng = np.random.default_rng(0)
    windows = [_window(rng, int(rng.integers(10, 130))) for _ in range(3000)]
    results = _mask_each(masker, windows, [window_seed(0, f"doc{i}", 0, 0) for i in range(len(windows))])
    masked = random = kept = chosen = candidates = 0
    for (ids, special), (input_ids, positions, labels) in zip(windows, results, strict=True):
        assert np.array_equal(labels, ids[positions]), "labels are the original ids"
        assert not special[positions].any(), "special tokens are never chosen"
        assert np.all(np.diff(positions) > 0)
        unchanged = input_ids == ids
        assert unchanged[np.setdiff1d(np.arange(len(ids)), positions)].all(), "only chosen positions change"
        assert len(positions) == max(1, round((len(ids) - 2) * 0.15))
        new = input_ids[positions]
        masked += int((new == MASK_ID).sum())
        kept += int((new == ids[positions]).sum())
        random += int(((new != MASK_ID) & (new != ids[positions])).sum())
        chosen += len(positions)
        candidates += len(ids) - 2
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    # A random replacement can draw the original id (1 in ~1000): it then counts as kept.
    assert abs(random / chosen - 0.1) < 0.01
    assert abs(kept / chosen - 0.1) < 0.01


def test_masking_together_draws_what_each_window_drew_alone():
    """Same bytes as before: windows of every length, some with extra or only special tokens, two settings."""
    rng = np.random.default_rng(3)
    for settings in (MaskingConfig(), MaskingConfig(probability=0.4, mask=0.5, random=0.3, keep=0.2, seed=9)):
        masker = Masker(settings, MASK_ID, SPECIALS, VOCAB)
        windows = []
        for i in range(2000):
            ids, special = _window(rng, int(rng.integers(2, 140)))
            if i % 97 == 0:
                special[:] = 1
            elif i % 13 == 0:
                special[rng.integers(0, len(ids), 3)] = 1
            windows.append((ids, special))
        seeds = [window_seed(settings.seed, f"de:x.txt:{i}", i % 3, i % 2) for i in range(len(windows))]
        for (ids, special), seed, got in zip(windows, seeds, _mask_each(masker, windows, seeds), strict=True):
            for value, expected in zip(got, _one_window_at_a_time(masker, ids, special, seed), strict=True):
                assert value.dtype == expected.dtype and np.array_equal(value, expected)


@pytest.mark.parametrize("stream", [None, 7])
def test_generators_start_where_default_rng_starts(stream):
    """Seeds below 2**32 are one entropy word, not two: the edges of that rule included."""
    seeds = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**64 - 1, *np.random.default_rng(5).integers(0, 2**63, 200).tolist()]
    entropies = [[seed] if stream is None else [seed, stream] for seed in seeds]
    for entropy, start in zip(entropies, pcg64_starts(entropies), strict=True):
        state = np.random.default_rng(entropy).bit_generator.state["state"]
        assert (state["state"], state["inc"]) == start


def test_generators_start_where_default_rng_starts_for_a_seed_and_an_index():
    """Stage two's examples: [seed, example index], both sides of 2**32 (an index of two words)."""
    entropies = [[seed, index] for seed in (0, 7, 2**40) for index in (0, 1, 31, 2**32 - 1, 2**32, 10**12)]
    for entropy, start in zip(entropies, pcg64_starts(entropies), strict=True):
        state = np.random.default_rng(entropy).bit_generator.state["state"]
        assert (state["state"], state["inc"]) == start


def test_random_replacements_are_ordinary_tokens():
    masker = Masker(MaskingConfig(mask=0.0, random=1.0, keep=0.0), MASK_ID, SPECIALS, VOCAB)
    window = _window(np.random.default_rng(1), 400)
    [(input_ids, positions, _)] = _mask_each(masker, [window], [window_seed(0, "d", 0, 0)])
    assert not np.isin(input_ids[positions], list(SPECIALS)).any()


def test_masking_depends_only_on_seed_and_window_identity():
    window = _window(np.random.default_rng(2), 100)

    def mask(seed: int, copy: int, others: int = 0):
        masker = Masker(MaskingConfig(seed=seed), MASK_ID, SPECIALS, VOCAB)
        # Other windows masked alongside change nothing for this one.
        rng = np.random.default_rng(others)
        batch = [_window(rng, 50) for _ in range(others)] + [window]
        seeds = [window_seed(seed, f"other:{i}", 0, 0) for i in range(others)]
        return _mask_each(masker, batch, [*seeds, window_seed(seed, "de:a.txt:3", 1, copy)])[-1]

    first = mask(7, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, mask(7, 0, others=5), strict=True))
    assert not np.array_equal(first[1], mask(7, 1)[1])
    assert not np.array_equal(first[1], mask(8, 0)[1])


def test_window_with_only_special_tokens_has_nothing_to_predict():
    masker = Masker(MaskingConfig(), MASK_ID, SPECIALS, VOCAB)
    [(input_ids, positions, _)] = _mask_each(masker, [(np.array([2, 3]), np.array([1, 1]))], [1])
    assert len(positions) == 0 and list(input_ids) == [2, 3]
