"""A run folder: what `mdkd train` writes, and what eval, report, sweeps, the demo and the benchmarks read of it.

| path | written by | what it holds |
|---|---|---|
| `run.json` | train, first and last | the run's identity (config hash, cache identity), `complete`, the cache folder |
| `config.yaml` | train, at the start | the resolved train config, with its hash in a header comment |
| `teachers.json` | train, at the start | the teacher selection it trains with: {language: {teacher: weight}} |
| `heldout.json` | train, at the start | the held-out documents (rule, fraction, doc_ids), so eval scores exactly them |
| `vocab/` | train, at the start | the merged vocabulary and id maps (`Alignment.save`) |
| `inheritance.json` | train, at the start | for a student with `student.init`: its body, layers, rows per path |
| `metrics.jsonl` | train, every step | one JSON object per training step and per held-out evaluation |
| `checkpoints/` | train (DeepSpeed) | engine checkpoints with the data position |
| `student/` | train, at the end | the exported HF model and tokenizer, and its model card (`README.md`) |
| `trackers/` | train, every step | the experiment trackers' files (TensorBoard, CSV, W&B) by default |
| `eval.json` | eval | the student against each teacher on held-out windows (eval also rewrites the model card) |

Nothing outside this module names these files; every command that reads or writes a run goes through a
`RunFolder`. Taking a folder over (new, resume, complete, refuse) follows the protocol of
`mdkd.pipeline.output_folder`, with `run.json` as the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import yaml

from mdkd.pipeline.cache.documents import HELD_OUT_RULE, held_out
from mdkd.pipeline.config import dump_config
from mdkd.pipeline.distill import checkpoints
from mdkd.pipeline.distill.config import TrainConfig, load_train_config
from mdkd.pipeline.distill.plan import TeacherSelection
from mdkd.pipeline.distributed import Ranks
from mdkd.pipeline.errors import UserError
from mdkd.pipeline.files import sync_folder, write_json_atomic
from mdkd.pipeline.output_folder import LOCK_NAME, FolderClaim, lock_folder, take_over
from mdkd.pipeline.store import Mirror, is_uri, location_name, open_folder, working_copy

RECORD = "run.json"


def local_run_path(location: Path | str) -> Path:
    """The local path of a run folder (`file://` URIs included); a URI of an object store is refused: a run there
    is opened with `RunFolder.open`, which works on it in a local copy, and a sweep is written locally for now."""
    folder = open_folder(location)
    if not folder.is_local:
        raise UserError(f"--out {location}: a sweep is written to a local folder for now (one run may be a URI)")
    return folder.path


class MetricsLog:
    """`metrics.jsonl`: the run's metrics, one JSON object per line (the source of truth for every figure).

    A `MetricsLogger` (mdkd.pipeline.distill.metrics): training logs its records here on rank 0."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, records: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)

    def close(self) -> None:
        """Every record is written when `log` returns; nothing is held open."""

    def read(self) -> list[dict]:
        """Every record, in order; a last line torn by a crash mid-write is left out (the next resume drops it)."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = []
        for index, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if index == len(lines) - 1:
                    break
                raise UserError(f"{self.path} line {index + 1} is not JSON (the file is damaged)") from None
        return records

    def keep_until(self, step: int) -> None:
        """Drop the records past `step`, where a resumed run continues, so that every step is logged once; the file is
        replaced whole (a crash leaves the old one or the new one)."""
        if not self.path.exists():
            return
        kept = [record for record in self.read() if record["step"] <= step]
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        os.replace(temporary, self.path)
        sync_folder(self.path.parent)


class RunFolder:
    """One run folder (see the module docstring for its files). A run on an object store (`open` with a URI) is
    worked on in a local working copy, downloaded first; `sync` uploads what changed (every checkpoint, the end)."""

    def __init__(self, path: Path | str, mirror: Mirror | None = None):
        self.path = local_run_path(path)  # a run on a store is opened with `open`, in its working copy
        self.mirror = mirror
        self.vocab_dir = self.path / "vocab"
        self.student_dir = self.path / "student"
        self.checkpoints_dir = self.path / "checkpoints"
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self._record = self.path / RECORD
        self._config = self.path / "config.yaml"
        self._teachers = self.path / "teachers.json"
        self._held_out = self.path / "heldout.json"
        self._eval = self.path / "eval.json"
        self._inheritance = self.path / "inheritance.json"

    @classmethod
    def open(cls, location: Path | str, ranks: Ranks) -> RunFolder:
        """The run folder `mdkd train --out` names: a local folder, or a prefix on a store, whose objects are
        downloaded into its working copy (locked first, so that no other process on this machine works on it)."""
        if not is_uri(location) or open_folder(location).is_local:
            return cls(location)
        if ranks.world_size > 1:
            raise UserError(
                f"--out {location}: a run on an object store trains in one process for now (or give a local folder)"
            )
        local = working_copy(location)
        lock_folder(local)
        mirror = Mirror(location, local, records_last=(checkpoints.RECORD, RECORD), keep=LOCK_NAME)
        mirror.pull()
        return cls(local, mirror)

    def sync(self) -> None:
        """Upload what changed since the last sync to the store the run lives on, its record last (a local run:
        nothing to do)."""
        if self.mirror is not None:
            self.mirror.push()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def title(self) -> str:
        """What the run is called where a person reads it (a tracker's run, the model card): its folder's name, or
        the last part of its URI."""
        return PurePosixPath(self.mirror.remote.uri).name if self.mirror is not None else self.path.resolve().name

    def trackers_dir(self, configured: str | None) -> Path:
        """Where the experiment trackers write: `trackers.dir` (a relative one from the run folder), else
        RUN/trackers."""
        return self.path / configured if configured else self.path / "trackers"

    # ---------------------------------------------------------------- the record: identity and completion

    def is_run(self) -> bool:
        """Whether the folder holds a run (complete or not)."""
        return self._record.exists()

    def claim(self, identity: dict, ranks: Ranks, *, resume: str | None, overwrite: bool, start) -> FolderClaim:
        """Take the folder over for a run of `identity` on every rank (`output_folder.take_over`); rank 0 calls
        `start(claim)` on a new, replaced or resumed run before any rank goes on."""
        return take_over(
            self.path,
            RECORD,
            identity,
            ranks,
            what="run",
            is_record=_is_run_record,
            overwrite=overwrite and not resume,
            resume=resume is not None,
            resume_hint="pass --resume auto to continue it",
            resume_only=resume is not None,
            start=start,
        )

    def record(self) -> dict:
        if not self.is_run():
            raise UserError(f"{self.path} is not an mdkd run folder (no {RECORD} from `mdkd train`)")
        return json.loads(self._record.read_text(encoding="utf-8"))

    def write_record(self, identity: dict, complete: bool, cache_dir: Path | str, **extra) -> None:
        record = {"identity": identity, "complete": complete, **extra, "cache": location_name(cache_dir)}
        write_json_atomic(self._record, record)

    def cache_dir(self) -> Path | str:
        """The cache the run was trained from, as its record names it (a local path, or a URI)."""
        cache = self.record().get("cache", "")
        return cache if is_uri(cache) else Path(cache)

    # ---------------------------------------------------------------- what the run was told to do

    def write_config(self, config: TrainConfig, source: Path, identity: dict, cache_dir: Path | str) -> None:
        header = (
            f"# mdkd train config (resolved from {source}); hash {identity['config_hash']}\n"
            f"# cache: {location_name(cache_dir)}\n"
        )
        self._config.write_text(header + dump_config(config), encoding="utf-8")

    def has_config(self) -> bool:
        return self._config.exists()

    def config(self) -> TrainConfig:
        return load_train_config(self._config)

    def config_values(self) -> dict:
        """The resolved config as plain values (for comparing runs key by key)."""
        return yaml.safe_load(self._config.read_text(encoding="utf-8"))

    def write_teachers(self, selection: TeacherSelection) -> None:
        write_json_atomic(self._teachers, {"teachers": selection})

    def teachers(self) -> TeacherSelection | None:
        """The teacher selection the run trained with; None for a run written before mdkd recorded it."""
        if not self._teachers.exists():
            return None
        return json.loads(self._teachers.read_text(encoding="utf-8"))["teachers"]

    def write_held_out(self, fraction: float, doc_ids: Iterable[str]) -> None:
        """Record the held-out documents (those of `doc_ids` the rule holds out), so that eval scores exactly them."""
        documents = sorted({d for d in doc_ids if held_out(d, fraction)})
        write_json_atomic(self._held_out, {"eval_fraction": fraction, "rule": HELD_OUT_RULE, "documents": documents})

    def held_out_rule(self) -> Callable[[str], bool]:
        """The recorded held-out documents, as a predicate on doc_ids."""
        if not self._held_out.exists():
            raise UserError(f"{self.path} has no {self._held_out.name} (give a run folder of `mdkd train`)")
        return set(json.loads(self._held_out.read_text(encoding="utf-8"))["documents"]).__contains__

    def write_inheritance(self, stats: dict) -> None:
        """How an inheriting student was made: its body, the layers kept, and how many vocabulary rows took each
        path (inherit.py)."""
        write_json_atomic(self._inheritance, stats)

    def inheritance(self) -> dict | None:
        """inheritance.json, or None for a student trained from scratch."""
        return json.loads(self._inheritance.read_text(encoding="utf-8")) if self._inheritance.exists() else None

    # ---------------------------------------------------------------- what came out

    @property
    def model_card(self) -> Path:
        """The exported student's model card, where the Hub and `huggingface_hub` look for it."""
        return self.student_dir / "README.md"

    def write_model_card(self, text: str) -> None:
        """Replace the student's README.md whole (a crash leaves the old card or the new one)."""
        temporary = self.model_card.with_name(f".{self.model_card.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.model_card)

    def has_student(self) -> bool:
        return (self.student_dir / "config.json").exists()

    def has_eval(self) -> bool:
        return self._eval.exists()

    def eval_file(self) -> Path:
        """Where `mdkd eval RUN` writes its report by default."""
        return self._eval

    def evaluation(self) -> dict | None:
        """eval.json, or None when `mdkd eval` has not run."""
        return json.loads(self._eval.read_text(encoding="utf-8")) if self._eval.exists() else None


def _is_run_record(record: dict) -> bool:
    """Whether a parsed run.json is one `mdkd train` wrote: --overwrite replaces nothing else."""
    identity = record.get("identity")
    return (
        isinstance(identity, dict)
        and isinstance(identity.get("config_hash"), str)
        and isinstance(identity.get("cache"), dict)
        and isinstance(record.get("complete"), bool)
        and isinstance(record.get("cache"), str)
    )
