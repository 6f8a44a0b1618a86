"""Uploads described by the deployed MLLM at search time, with the captioner and prompt that
described the catalog: an uploaded photo's query then reads a description like a catalog item's
instead of one the attribute heads predict (which costs 11 R@10 on change-only captions: BENCHMARKS.md,
"Round 9: what each attribute of an upload is worth").

A search must not wait on a failing MLLM: a photo is asked once (its record, or that its answers
did not fit the attribute format, is kept by content; searches of a photo being asked about wait
for that answer instead of asking again); when the MLLM gives no answer at all it is
left alone for ``pause_s`` and searches fall back at once; the MLLM sees the decoded photo, at most
``max_side`` pixels on its long side, not the raw upload."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..captioning.base import Captioner
from ..captioning.precomputed import PrecomputedCaptioner
from ..captioning.runner import caption_one
from ..errors import ModelError

log = logging.getLogger(__name__)
NO_ANSWER, INVALID = "gave no answer", "gave no answer in the attribute format"


class UploadDescriber:
    """``describe(raw upload, decoded photo) -> (record, None)`` or ``(None, why not)`` (the
    details go to the log, not to clients). Records are the catalog's layout (attribute values,
    ``kids``, ``description``); the last ``cache_size`` photos' outcomes are kept by content."""

    def __init__(
        self,
        captioner: Captioner,
        max_attempts: int = 2,
        cache_size: int = 256,
        pause_s: float = 30.0,
        max_side: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(captioner, PrecomputedCaptioner):
            raise ModelError(
                "precomputed answers are looked up by catalog id and cannot describe an uploaded photo: "
                "describe uploads with a served MLLM (the openai or llava-hf backend)"
            )
        self.captioner, self.max_attempts, self.cache_size = captioner, max_attempts, cache_size
        self.pause_s, self.max_side, self.clock = pause_s, max_side, clock
        self._outcomes: OrderedDict[str, dict[str, Any] | str] = OrderedDict()  # record, or INVALID
        self._changed = threading.Condition()  # guards the outcomes; says when an asked photo has one
        self._asking_now: set[str] = set()
        self.waiting = 0  # searches waiting for another's outcome about their photo
        self._asking = threading.Lock() if not captioner.thread_safe else None  # one model, one caller
        self._silent_until = float("-inf")

    @property
    def model_id(self) -> str:
        return self.captioner.model_id

    def describe(self, raw: bytes, photo: Image.Image) -> tuple[dict[str, Any] | None, str | None]:
        key = hashlib.sha1(raw).hexdigest()
        with self._changed:
            while key in self._asking_now:  # another search asks about this photo: wait for its outcome
                self.waiting += 1
                self._changed.wait()
                self.waiting -= 1
            outcome = self._outcomes.get(key)
            if outcome is not None:
                self._outcomes.move_to_end(key)
            elif self.clock() < self._silent_until:
                outcome = NO_ANSWER
            else:
                self._asking_now.add(key)
        if outcome is None:
            outcome = NO_ANSWER
            try:
                outcome = self._ask(key, photo)
            finally:
                self._settle(key, outcome)
        if isinstance(outcome, str):
            return None, f"the MLLM ({self.model_id}) {outcome}"
        return outcome, None

    def _settle(self, key: str, outcome: dict[str, Any] | str) -> None:
        with self._changed:
            self._asking_now.discard(key)
            if outcome == NO_ANSWER:
                self._silent_until = self.clock() + self.pause_s
            else:
                self._outcomes[key] = outcome
                while len(self._outcomes) > self.cache_size:
                    self._outcomes.popitem(last=False)
            self._changed.notify_all()

    def _ask(self, key: str, photo: Image.Image) -> dict[str, Any] | str:
        try:
            with tempfile.TemporaryDirectory(prefix="fashion-cir-upload-") as folder:
                path = Path(folder) / "upload.jpg"
                shown = photo.convert("RGB")
                shown.thumbnail((self.max_side, self.max_side))
                shown.save(path, "JPEG", quality=90)
                with self._asking or contextlib.nullcontext():
                    result = caption_one(self.captioner, f"upload-{key[:12]}", path, self.max_attempts)
        except Exception:  # a search falls back to the heads whatever the captioner raised
            log.exception("the MLLM (%s) failed on an upload", self.model_id)
            return NO_ANSWER
        if result["status"] == "ok":
            return {name: value for name, value in result["attributes"].items() if name != "image"}
        log.warning("the MLLM (%s) did not describe an upload: %s", self.model_id, result["error"])
        return INVALID if result["status"] == "invalid" else NO_ANSWER
