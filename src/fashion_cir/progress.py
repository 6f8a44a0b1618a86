"""Progress a person can read: a tqdm bar on a terminal; in a log (CI, nohup, ``> file``) one line
every ``every`` seconds and one at the end, with done/total, rate and elapsed time."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update(n)`` as work is done, ``close()`` (or a ``with`` block) when it ends; ``enabled``
    False prints nothing."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        every: float = 30.0,
        stream: TextIO | None = None,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = self.initial = initial
        self.started = self.last_line = time.perf_counter()
        self.postfix = ""
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True
            )

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.done += n
        self.postfix = postfix or self.postfix
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix)
        elif time.perf_counter() - self.last_line >= self.every:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        extra = f", {self.postfix}" if self.postfix else ""
        print(
            f"  {self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, {elapsed:.0f} s{extra})",
            file=self.stream,
            flush=True,
        )
        self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.initial:
            self._line()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
