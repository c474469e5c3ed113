"""BERT-style masking of tokenised windows.

The random choices for a window depend only on (seed, doc_id, window, copy): not on the rank that processes it,
the batch it lands in, or whether the run was resumed. Two teachers that share a tokenizer therefore see exactly
the same masked input, and a resumed run writes the same bytes as an uninterrupted one.

Like Google's BERT, each window gets `max(1, round(n * probability))` predicted positions chosen among its
`n` ordinary tokens (special tokens are never chosen), so every window teaches something and the rate is exact.
Each chosen position becomes the mask token, a random ordinary token, or stays as it is (80/10/10 by default).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mdkd.pipeline.teacher_pass.config import MaskingConfig


@dataclass(frozen=True)
class MaskedWindow:
    input_ids: np.ndarray  # int32, after masking, with special tokens
    positions: np.ndarray  # int32, indices of the predicted positions, ascending
    labels: np.ndarray  # int32, the original ids at those positions


def window_seed(seed: int, doc_id: str, window: int, copy: int) -> int:
    """A 64-bit seed from the window's identity (stable across processes, unlike Python's hash())."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}\0{window}\0{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Masker:
    """Masks windows of one tokenizer's ids with the configured rates."""

    def __init__(self, settings: MaskingConfig, mask_token_id: int, special_ids: set[int], vocab_size: int):
        self.settings = settings
        self.mask_token_id = mask_token_id
        # Random replacements are drawn from ordinary tokens only: a random [CLS] mid-sentence teaches nothing.
        self.replacement_ids = np.array([i for i in range(vocab_size) if i not in special_ids], dtype=np.int32)

    def __call__(
        self, ids: list[int] | np.ndarray, special_mask: list[int] | np.ndarray, doc_id: str, window: int, copy: int
    ) -> MaskedWindow:
        original = np.asarray(ids, dtype=np.int32)
        candidates = np.flatnonzero(np.asarray(special_mask) == 0)
        count = max(1, int(round(len(candidates) * self.settings.probability))) if len(candidates) else 0
        rng = np.random.default_rng(window_seed(self.settings.seed, doc_id, window, copy))
        positions = np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int32)
        draws = rng.random(count)
        replacements = rng.choice(self.replacement_ids, size=count)
        masked = original.copy()
        to_mask = draws < self.settings.mask
        to_random = (draws >= self.settings.mask) & (draws < self.settings.mask + self.settings.random)
        masked[positions[to_mask]] = self.mask_token_id
        masked[positions[to_random]] = replacements[to_random]
        return MaskedWindow(input_ids=masked, positions=positions, labels=original[positions])
