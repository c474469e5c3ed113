"""What the benchmarks in bench/ share: their first flags (--preset, --tiny, --seed), their scratch folder, where
their output goes (figures on stdout, the JSON line last; everything else on stderr) and three small measurements.

The benchmarks are run as `python bench/<script>.py`, which puts bench/ first on sys.path, so they import this
module as `common`; code elsewhere (a test) that imports it puts bench/ on sys.path first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def preset_parser(description: str, presets: dict) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark has; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), default="small")
    parser.add_argument(
        "--tiny",
        dest="preset",
        action="store_const",
        const="tiny",
        help="same as --preset tiny: a smoke run (its figures mean little)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


@contextlib.contextmanager
def session(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh scratch folder, removed afterwards unless `keep`. Meanwhile sys.stdout is stderr: the stages,
    DeepSpeed and transformers print there, so nothing they print can follow the JSON line; `say` still writes
    to stdout."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield scratch
    finally:
        if keep:
            say(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def say(line: str) -> None:
    """A line of figures for the reader, on the process's stdout even inside `session`."""
    print(line, file=sys.__stdout__, flush=True)


def print_figures(figures: dict) -> None:
    """The last line of stdout: one JSON object with every figure (what a caller parses)."""
    say(json.dumps(figures))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    VmHWM first: ru_maxrss survives fork and exec on Linux, so a child started from an (already large) benchmark
    process would report the parent's peak; VmHWM belongs to the address space exec creates.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count): always one of the measured values."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def peak_memory_above_start(work: Callable[[], None], device) -> int:
    """Bytes: the most memory `work` held at once above what was held when it started.

    On CUDA, the caching allocator's own counters (`max_memory_allocated` less `memory_allocated` at the start). On
    the CPU there is no allocator counter: the resident set's peak (VmHWM, reset through /proc/self/clear_refs) less
    the resident set at the start. That counts what malloc keeps mapped, so it is exact for tensors only when every
    large allocation is its own mapping, returned at free: run with MALLOC_MMAP_THRESHOLD_=65536 in the environment
    (glibc's threshold otherwise grows to 32 MiB and freed tensors stay in the heap, resident).
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    start = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    work()
    return (_status_kb("VmHWM") - start) * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
