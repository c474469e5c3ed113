"""Document ids and the held-out rule: how both stages (and the demo) name a document and decide it is held out.

A `doc_id` is `<language>:<local id>`, the local id naming the document inside its source (`file:line` for a
text or JSON-lines file, `file:row` for Parquet, `dataset:row` for a `datasets` spec). The held-out split is a
function of the doc_id alone, so every teacher, rank, run and the demo's teacher pre-training agree on it. A
run records the documents it held out in its folder (`RunFolder.write_held_out`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

HELD_OUT_RULE = "blake2b-64(doc_id) / 2^64 < eval_fraction"


def doc_id(language: str, local_id: str) -> str:
    """The cache's name for a document of `language` whose source calls it `local_id`."""
    return f"{language}:{local_id}"


def held_out(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out split by document: the same for every teacher, rank and run."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def fraction_rule(fraction: float) -> Callable[[str], bool]:
    """The held-out rule for one `eval_fraction`, as a predicate on doc_ids."""
    return lambda document: held_out(document, fraction)
