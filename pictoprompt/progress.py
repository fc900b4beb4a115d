"""Progress reporting and cooperative cancellation, shared by the CLI, the server, the tools and the methods.

A long computation calls `progress.step(...)` between its steps; that reports how far it is and raises
`JobCancelledError` once someone has called `cancel()`. Nothing here knows who listens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pictoprompt.errors import JobCancelledError

ProgressCallback = Callable[[float, float | None, str | None], None]


class Progress:
    """A progress sink with a cancellation flag; thread-safe to cancel from another thread."""

    def __init__(self, callback: ProgressCallback | None = None) -> None:
        self._callback = callback
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise `JobCancelledError` if the work has been cancelled."""
        if self._cancelled.is_set():
            raise JobCancelledError("The job was cancelled before it finished; nothing was kept from it.")

    def report(self, done: float, total: float | None = None, message: str | None = None) -> None:
        if self._callback is not None:
            self._callback(done, total, message)

    def step(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress, then stop here if the work was cancelled."""
        self.report(done, total, message)
        self.check()

    def scaled(self, start: float, span: float, total: float) -> Progress:
        """A child that maps its own 0..1 fraction onto [start, start + span] of `total`, sharing cancellation."""
        parent = self

        def forward(done: float, child_total: float | None, message: str | None) -> None:
            fraction = done / child_total if child_total else 0.0
            parent.report(start + span * fraction, total, message)

        child = Progress(forward)
        child._cancelled = parent._cancelled
        return child
