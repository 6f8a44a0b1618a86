"""The Coalescer (models/batching.py): callers that arrive while a pass runs share the next pass,
each gets its own rows, a pass's error reaches each of its callers, and a pass holds at most
``max_texts`` texts. Threads are ordered with events, not sleeps."""

from __future__ import annotations

import threading

import pytest
import torch

from fashion_cir.models.batching import Coalescer


def _rows(texts: list[str]) -> torch.Tensor:
    """A stand-in encoder: each text's row is (its length, its first character's code)."""
    return torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts])


class Gate:
    """An encoder whose first pass waits until the test opens the gate."""

    def __init__(self, fail_on: str | None = None):
        self.entered, self.open = threading.Event(), threading.Event()
        self.passes: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.passes.append(list(texts))
        if len(self.passes) == 1:
            self.entered.set()
            assert self.open.wait(60)
        if self.fail_on in texts:
            raise ValueError(f"cannot encode {self.fail_on!r}")
        return _rows(texts)


def _start(coalescer: Coalescer, texts: list[str], answers: dict) -> threading.Thread:
    def call() -> None:
        try:
            answers[texts[0]] = coalescer(texts)
        except ValueError as exc:
            answers[texts[0]] = exc

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def _wait_until(condition, what: str) -> None:
    for _ in range(6000):
        if condition():
            return
        threading.Event().wait(0.01)
    pytest.fail(f"never: {what}")


def test_callers_that_arrive_during_a_pass_share_the_next_one():
    gate = Gate()
    coalescer = Coalescer(gate)
    answers: dict = {}
    first = _start(coalescer, ["alpha"], answers)
    assert gate.entered.wait(60)
    later = [_start(coalescer, texts, answers) for texts in (["bb", "ccc"], ["dddd"], ["e"])]
    _wait_until(lambda: coalescer.waiting == 3, "three callers queued")
    gate.open.set()
    for thread in [first, *later]:
        thread.join(60)
    assert gate.passes[0] == ["alpha"] and len(gate.passes) == 2
    assert sorted(gate.passes[1]) == ["bb", "ccc", "dddd", "e"]
    for texts in (["alpha"], ["bb", "ccc"], ["dddd"], ["e"]):
        torch.testing.assert_close(answers[texts[0]], _rows(texts))
    assert coalescer.passes == 2 and coalescer.waiting == 0
    torch.testing.assert_close(coalescer(["zz"]), _rows(["zz"]))  # a lone caller runs at once
    assert gate.passes[-1] == ["zz"]


def test_a_pass_error_reaches_its_callers_only_and_passes_are_bounded():
    gate = Gate(fail_on="bad")
    coalescer = Coalescer(gate, max_texts=3)
    answers: dict = {}
    first = _start(coalescer, ["alpha"], answers)
    assert gate.entered.wait(60)
    queued = []
    for texts in (["bad", "x"], ["yy"], ["zzz", "w"], ["v"]):  # queued in this order
        queued.append(_start(coalescer, texts, answers))
        _wait_until(lambda count=len(queued): coalescer.waiting == count, "each caller queued in turn")
    gate.open.set()
    for thread in [first, *queued]:
        thread.join(60)
    assert gate.passes == [["alpha"], ["bad", "x", "yy"], ["zzz", "w", "v"]]  # at most 3 texts a pass
    assert isinstance(answers["bad"], ValueError) and isinstance(answers["yy"], ValueError)
    for texts in (["alpha"], ["zzz", "w"], ["v"]):
        torch.testing.assert_close(answers[texts[0]], _rows(texts))
    with pytest.raises(ValueError, match="cannot encode 'bad'"):
        coalescer(["bad"])
    torch.testing.assert_close(coalescer(["ok"]), _rows(["ok"]))  # the coalescer works on after an error
