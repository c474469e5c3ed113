"""Stage one's host path in worker processes: tokenising, windowing, masking and collating units of work.

Python's per-window work (tokenizer output to arrays, seeding and drawing each window's masking, padding) is
bound by one interpreter, so one thread beside the teacher cannot keep up with an accelerator. A
`torch.utils.data.DataLoader` runs `UnitPreparation` on blocks of documents in `workers` processes and hands
the prepared units back in the order the blocks were read, whatever worker finished first; with 0 workers it
runs them in the calling process. What a unit holds depends only on its documents and the config, never on
the worker that prepared it, so any number of workers writes the same bytes.

Workers are forked from a fork server (spawned where there is none), never from the stage's own process: a
plain fork would hand them its open files, the output folder's lock among them, and a run killed with -9 would
leave its folder locked until its orphaned workers noticed. The server preloads this module (torch, the
tokenizers) once per process, so starting a teacher's workers costs little after the first. A worker's parent is
then the server, which lives as long as any worker holds its pipe, so torch's own watchdog (is my parent alive?)
would keep a worker of a killed stage waiting forever, and the server with it: each worker watches the stage's
process itself and exits when it ends.

The documents are read in the process that iterates the loader (stage one does so in a background thread) and
sent to the workers with each block: every worker reading the whole corpus to find its blocks would read it as
many times as there are workers.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from torch.utils.data import DataLoader, Dataset

from mdkd.pipeline.errors import UserError
from mdkd.pipeline.teacher_pass.corpus import Document
from mdkd.pipeline.teacher_pass.masking import Masker
from mdkd.pipeline.teacher_pass.windows import Batch, PreparedUnit, TailSampling, plan_batches, prepare_unit

UNITS_AHEAD_PER_WORKER = 2  # DataLoader's prefetch_factor: a worker starts its next unit while one waits


def default_workers() -> int:
    """The cores this process may use, shared among the ranks on this machine, less one for each rank's main
    process (which runs the teacher); 0, preparing in-process, when that leaves none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


@dataclass(frozen=True)
class UnitBlock:
    """A unit's documents: part `part` of `language`, `shard_documents` consecutive documents (fewer at the end)."""

    language: str
    part: int
    documents: list[Document]


@dataclass
class ReadyUnit:
    """A unit prepared for its teacher: its rows and its forward passes, in batches."""

    language: str
    part: int
    documents: int
    unit: PreparedUnit
    batches: list[Batch]

    def with_tensors(self, pin: bool) -> ReadyUnit:
        return replace(self, batches=[batch.tensors(pin) for batch in self.batches])

    def pin_memory(self) -> ReadyUnit:
        """Called by the DataLoader's pin-memory thread when the teacher runs on CUDA."""
        return self.with_tensors(pin=True)


class UnitPreparation(Dataset):
    """Turns a `UnitBlock` into a `ReadyUnit` for one teacher: its tokenizer, masking and batch settings.

    Keyed by the blocks themselves (a map-style dataset's keys need not be integers), so the loader's sampler
    is the stream of blocks read from the corpus."""

    def __init__(
        self,
        tokenizer,
        masker: Masker,
        max_length: int,
        copies: int,
        pad_id: int,
        batch_tokens: int | None,
        batch_size: int | None,
        tail: TailSampling | None,
    ):
        self.tokenizer, self.masker, self.max_length, self.copies = tokenizer, masker, max_length, copies
        self.pad_id, self.batch_tokens, self.batch_size, self.tail = pad_id, batch_tokens, batch_size, tail

    def __getitem__(self, block: UnitBlock) -> ReadyUnit | UserError:
        try:
            unit = prepare_unit(block.documents, self.tokenizer, self.masker, self.max_length, self.copies)
        except UserError as error:
            # Returned, not raised: the DataLoader would re-raise it with the worker's traceback in its message.
            return error
        batches = plan_batches(unit.rows, self.pad_id, self.batch_tokens, self.batch_size, self.tail)
        return ReadyUnit(block.language, block.part, len(block.documents), unit, batches)


def _as_prepared(item):
    """The loader's collate_fn: a unit is its own batch (the default would try to convert it)."""
    return item


def _start_worker(stage_pid: int, _worker_id: int) -> None:
    # Each worker is one core's worth of work: the tokenizer's own thread pool would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_after, args=(stage_pid,), name="mdkd-stage-watch", daemon=True).start()


def _exit_after(pid: int) -> None:
    """Wait for process `pid` to end (a pidfd where Linux has one, else a poll each second), then end this one."""
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once the process has ended
    except (AttributeError, OSError):
        while _is_running(pid):
            time.sleep(1.0)
    os._exit(0)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_context(tokenizer) -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only heeded before the server starts (the first teacher's): later tokenizer classes are imported per worker.
    context.set_forkserver_preload([__name__, type(tokenizer).__module__])
    return context


def ready_units(
    preparation: UnitPreparation, blocks: Iterable[UnitBlock], workers: int, pin: bool
) -> Iterator[ReadyUnit]:
    """The blocks' units, prepared by `workers` processes (0: here), in the blocks' order, their batches as
    tensors (in page-locked memory when `pin`). Up to `UNITS_AHEAD_PER_WORKER` units per worker are prepared
    ahead, so that many are in memory at once."""
    loader = DataLoader(
        preparation,
        batch_size=None,
        sampler=blocks,
        num_workers=workers,
        collate_fn=_as_prepared,
        pin_memory=pin,
        worker_init_fn=functools.partial(_start_worker, os.getpid()) if workers else None,
        prefetch_factor=UNITS_AHEAD_PER_WORKER if workers else None,
        multiprocessing_context=_worker_context(preparation.tokenizer) if workers else None,
    )
    for item in loader:
        if isinstance(item, UserError):
            raise item
        yield item if pin else item.with_tensors(pin=False)
