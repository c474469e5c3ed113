"""Overlapping host work with the model's forward and backward passes: prefetching inputs and writing outputs in
threads, for both stages.

The forward pass releases the GIL, and so does most of what these threads wait on. In stage one the prefetch
thread reads the corpus and receives units from the worker processes (or, with no workers, prepares them itself),
and the writer thread builds and writes the shards (Arrow and Parquet are C++); in stage two the prefetch thread
draws, maps and collates the next step's batches (`distill.data.StepLoader`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1, wait_on_close: bool = False) -> Iterator[T]:
    """Iterate `items` in a background thread, keeping up to `depth` items ready; errors surface in the caller.

    With `wait_on_close`, closing the iterator also waits for the thread to finish the item it is on, so that none
    of its work outlives the caller's loop: torch work in a daemon thread at interpreter exit can abort the process
    (stage two's loader collates tensors; stage one's thread mostly waits on its worker processes)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple) -> bool:
        """Put `entry` once there is room; False when the caller stopped listening first."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it with its traceback
            offer((_DONE, exc))

    thread = threading.Thread(target=produce, daemon=True, name="mdkd-prefetch")
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        if wait_on_close:
            thread.join()


class BackgroundJobs:
    """Runs submitted jobs one after another in a single thread; `submit` blocks when `depth` jobs wait.

    A job's exception is raised from the next `submit` or from `close`, so a failed write stops the run.
    """

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True, name="mdkd-writer")
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _DONE:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:
                    self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_pending()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every submitted job; raise the first error any of them hit."""
        self._jobs.put(_DONE)
        self._thread.join()
        self._raise_pending()
