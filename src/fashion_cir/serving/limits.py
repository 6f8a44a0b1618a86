"""A bound on concurrent heavy requests (decoding an upload and encoding it): at most ``workers``
run at once, at most ``queue`` more wait, and the rest are refused at once (the service answers
503 with Retry-After) instead of piling decoded images up in memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """Every worker and queue place is taken."""


class ConcurrencyLimit:
    def __init__(self, workers: int = 2, queue: int = 16):
        if workers < 1 or queue < 0:
            raise ValueError("workers must be >= 1 and queue >= 0")
        self.workers, self.queue = workers, queue
        self._admitted = threading.BoundedSemaphore(workers + queue)
        self._running = threading.BoundedSemaphore(workers)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Run the block when a worker is free; raise Busy at once when the queue is full too."""
        if not self._admitted.acquire(blocking=False):
            raise Busy()
        try:
            with self._running:
                yield
        finally:
            self._admitted.release()
