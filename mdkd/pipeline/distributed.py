"""Rank bookkeeping for runs launched under `torchrun` or the `deepspeed` launcher (or neither).

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK. A plain `mdkd ...` is rank 0 of 1 and never touches
torch.distributed. Console output (progress bars, summaries) comes from rank 0 only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import click
import torch


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def echo(self, message: str, err: bool = False) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            click.echo(message, err=err)

    def progress_enabled(self) -> bool:
        """Bars on rank 0, and only on a terminal: in a batch job's log (or after an error) bar frames are noise;
        the JSON-lines logs carry the progress there."""
        return self.is_main and sys.stderr is not None and sys.stderr.isatty()


def quiet_deepspeed() -> None:
    """Tell DeepSpeed which accelerator it runs on before it is imported, so that it does not warn, on every
    machine without a GPU, that it fell back to the CPU (`DS_ACCELERATOR` set by the user is kept)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def start_process_group(ranks: Ranks, backend: str = "gloo", timeout_hours: float = 48) -> None:
    """Join the launcher's process group when there is more than one rank.

    The long timeout is deliberate: ranks meet at a barrier at the end of the teacher pass, and one rank may
    finish hours before the slowest one on an uneven corpus.
    """
    if ranks.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(hours=timeout_hours))


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_from_main(ranks: Ranks, value):
    """Rank 0's `value` on every rank (a picklable object); the value itself when there is one rank."""
    if ranks.world_size == 1 or not torch.distributed.is_initialized():
        return value
    box = [value if ranks.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def pick_device(requested: str, ranks: Ranks) -> torch.device:
    """auto: this rank's GPU when there is one, otherwise the CPU. A bare `cuda` also means this rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@contextmanager
def transformers_console(ranks: Ranks) -> Iterator[None]:
    """Let transformers print its load reports and weight loading/writing bars only where mdkd shows progress (rank 0
    on a terminal); restore its settings after.

    Off a terminal (a batch job's log, a pipe) the report's table and the bar frames are noise, and a checkpoint
    that lacks weights is refused with one line anyway.
    """
    from transformers.utils import logging as transformers_logging

    if ranks.progress_enabled():
        yield
        return
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
