"""Calls from many threads merged into one batch: a search encodes two short texts, and the
server answers several searches at once; one encoder pass over all of their texts costs less than
one pass each, and only one pass runs at a time (no two thread pools fighting over the cores)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class _Call:
    def __init__(self, texts: list[str]):
        self.texts = texts
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = False


class Coalescer:
    """``run(texts) -> [len(texts), d]`` shared by threads: a caller that finds a pass running
    queues its texts; when the pass ends, one waiting caller runs everything queued (up to
    ``max_texts`` texts) in one pass and each caller gets its own rows (or the pass's error). A
    lone caller runs at once: nothing waits for company."""

    def __init__(self, run: Callable[[list[str]], torch.Tensor], max_texts: int = 64):
        self._run = run
        self.max_texts = max_texts
        self._lock = threading.Condition()
        self._queue: list[_Call] = []
        self._busy = False
        self.passes = 0

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        call = _Call(list(texts))
        with self._lock:
            self._queue.append(call)
        while True:
            with self._lock:
                while self._busy and not call.done:
                    self._lock.wait()
                if call.done:
                    if call.error is not None:
                        raise call.error
                    return call.result  # type: ignore[return-value]
                self._busy = True
                batch: list[_Call] = []
                size = 0
                while self._queue and (not batch or size + len(self._queue[0].texts) <= self.max_texts):
                    size += len(self._queue[0].texts)
                    batch.append(self._queue.pop(0))
            self._pass(batch)

    def _pass(self, batch: list[_Call]) -> None:
        try:
            rows = self._run([text for c in batch for text in c.texts])
            start = 0
            for c in batch:
                c.result, start = rows[start : start + len(c.texts)], start + len(c.texts)
        except BaseException as exc:  # every caller of the pass sees its error
            for c in batch:
                c.error = exc
        finally:
            with self._lock:
                self.passes += 1
                for c in batch:
                    c.done = True
                self._busy = False
                self._lock.notify_all()
