"""Document ids and the held-out rule: how both stages (and the demo) name a document and decide it is held out.

A `doc_id` is `<language>:<local id>`, the local id naming the document inside its source (`file:line` for a
text or JSON-lines file, `file:row` for Parquet, `dataset:row` for a `datasets` spec). The held-out split is a
function of the doc_id alone, so every teacher, rank, run and the demo's teacher pre-training agree on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import write_json_atomic

HELD_OUT_FILE = "heldout.json"
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


def save_held_out(path: Path, fraction: float, doc_ids: Iterable[str]) -> None:
    """Record a run's held-out documents (those of `doc_ids` the rule holds out), so eval scores exactly them."""
    documents = sorted({d for d in doc_ids if held_out(d, fraction)})
    write_json_atomic(path, {"eval_fraction": fraction, "rule": HELD_OUT_RULE, "documents": documents})


def load_held_out(run_dir: Path) -> Callable[[str], bool]:
    """A run's recorded held-out documents, as a predicate on doc_ids."""
    path = run_dir / HELD_OUT_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {HELD_OUT_FILE} (give a run folder of `mdkd train`)")
    return set(json.loads(path.read_text(encoding="utf-8"))["documents"]).__contains__
