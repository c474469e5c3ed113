"""Masking: exact rate, the 80/10/10 split, labels, special tokens, determinism."""

from __future__ import annotations

import numpy as np

from mdkd.pipeline.teacher_pass.config import MaskingConfig
from mdkd.pipeline.teacher_pass.masking import Masker

MASK_ID, SPECIALS, VOCAB = 4, {0, 1, 2, 3, 4}, 1000


def _window(rng: np.random.Generator, length: int):
    ids = np.concatenate([[2], rng.integers(5, VOCAB, length - 2), [3]])
    special = np.zeros(length, dtype=int)
    special[[0, -1]] = 1
    return ids, special


def test_rate_split_and_labels_over_many_windows():
    masker = Masker(MaskingConfig(), MASK_ID, SPECIALS, VOCAB)
    rng = np.random.default_rng(0)
    masked = random = kept = chosen = candidates = 0
    for window in range(3000):
        ids, special = _window(rng, int(rng.integers(10, 130)))
        out = masker(ids, special, f"doc{window}", 0, 0)
        assert np.array_equal(out.labels, ids[out.positions]), "labels are the original ids"
        assert not special[out.positions].any(), "special tokens are never chosen"
        assert np.all(np.diff(out.positions) > 0)
        unchanged = out.input_ids == ids
        assert unchanged[np.setdiff1d(np.arange(len(ids)), out.positions)].all(), "only chosen positions change"
        assert len(out.positions) == max(1, round((len(ids) - 2) * 0.15))
        new = out.input_ids[out.positions]
        masked += int((new == MASK_ID).sum())
        kept += int((new == ids[out.positions]).sum())
        random += int(((new != MASK_ID) & (new != ids[out.positions])).sum())
        chosen += len(out.positions)
        candidates += len(ids) - 2
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    # A random replacement can draw the original id (1 in ~1000): it then counts as kept.
    assert abs(random / chosen - 0.1) < 0.01
    assert abs(kept / chosen - 0.1) < 0.01


def test_random_replacements_are_ordinary_tokens():
    masker = Masker(MaskingConfig(mask=0.0, random=1.0, keep=0.0), MASK_ID, SPECIALS, VOCAB)
    ids, special = _window(np.random.default_rng(1), 400)
    out = masker(ids, special, "d", 0, 0)
    assert not np.isin(out.input_ids[out.positions], list(SPECIALS)).any()


def test_masking_depends_only_on_seed_and_window_identity():
    masker = Masker(MaskingConfig(seed=7), MASK_ID, SPECIALS, VOCAB)
    ids, special = _window(np.random.default_rng(2), 100)
    first = masker(ids, special, "de:a.txt:3", 1, 0)
    again = Masker(MaskingConfig(seed=7), MASK_ID, SPECIALS, VOCAB)(ids, special, "de:a.txt:3", 1, 0)
    other_copy = masker(ids, special, "de:a.txt:3", 1, 1)
    other_seed = Masker(MaskingConfig(seed=8), MASK_ID, SPECIALS, VOCAB)(ids, special, "de:a.txt:3", 1, 0)
    assert np.array_equal(first.input_ids, again.input_ids) and np.array_equal(first.positions, again.positions)
    assert not np.array_equal(first.positions, other_copy.positions)
    assert not np.array_equal(first.positions, other_seed.positions)


def test_window_with_only_special_tokens_has_nothing_to_predict():
    out = Masker(MaskingConfig(), MASK_ID, SPECIALS, VOCAB)([2, 3], [1, 1], "d", 0, 0)
    assert len(out.positions) == 0 and list(out.input_ids) == [2, 3]
