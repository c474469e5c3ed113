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
whole unit at once, and the generators are started without NumPy's per-seed set-up (`pipeline/seeding.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mdkd.pipeline.cache.shards import offsets_of
from mdkd.pipeline.seeding import SeededGenerator, pcg64_starts
from mdkd.pipeline.teacher_pass.config import MaskingConfig


def window_seed(seed: int, doc_id: str, window: int, copy: int) -> int:
    """A 64-bit seed from the window's identity (stable across processes, unlike Python's hash())."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}\0{window}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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
        generators = SeededGenerator()
        for start, available, count in zip(
            pcg64_starts([[seed] for seed in seeds]), per_row.tolist(), counts.tolist(), strict=True
        ):
            if count == 0:
                continue
            generator = generators.at(start)
            chosen.append(generator.choice(available, size=count, replace=False))
            draws.append(generator.random(count))
            # choice(replacement_ids, size) draws integers(0, len(replacement_ids), size) and indexes with them.
            replacements.append(generator.integers(0, len(self.replacement_ids), size=count))
        position_offsets = offsets_of(counts)
        if not chosen:
            empty = np.zeros(0, dtype=np.int32)
            return MaskedRows(ids.copy(), empty, position_offsets, empty)
        first_candidate = offsets_of(per_row)[:-1]
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
