"""Where training and evaluation send their figures: one interface, so that a new destination (an experiment
tracker, say) is one more implementation, not a change to the loop.

The run's `metrics.jsonl` (`run.MetricsLog`) is the first implementation and stays the source of truth; the
experiment trackers (`trackers.Trackers`) are the second. The loop calls its logger on rank 0 only.
"""

from __future__ import annotations

from typing import Protocol


class MetricsLogger(Protocol):
    def log(self, records: list[dict]) -> None:
        """Take a step's records: one `split: train` record, and a `split: heldout` one on evaluation steps."""

    def close(self) -> None:
        """Flush and release whatever the logger holds; called once when training ends."""


class AllLoggers:
    """Several loggers as one: each record goes to each logger, in order."""

    def __init__(self, loggers: list[MetricsLogger]):
        self.loggers = loggers

    def log(self, records: list[dict]) -> None:
        for logger in self.loggers:
            logger.log(records)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
