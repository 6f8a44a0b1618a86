"""Uploads described by the deployed MLLM at search time, with the captioner and prompt that
described the catalog: an uploaded photo's query then reads a description like a catalog item's
instead of one the attribute heads predict (which costs 11 R@10 on change-only captions: BENCHMARKS.md,
"Round 9: what each attribute of an upload is worth"). Answers are kept by the photo's content, so
paging and new captions on the same photo ask once; a failure is reported and the search falls back
to the heads."""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from ..captioning.base import Captioner
from ..captioning.runner import caption_one
from ..errors import ModelError

log = logging.getLogger(__name__)
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
FAILURES = {"error": "no answer", "invalid": "no answer in the attribute format"}  # what a client is told


class UploadDescriber:
    """``describe(raw photo) -> (record, None)`` or ``(None, why not)`` (the details go to the log,
    not to clients); records are the catalog's layout (attribute values, ``kids``, ``description``),
    the last ``cache_size`` kept by content."""

    def __init__(self, captioner: Captioner, max_attempts: int = 2, cache_size: int = 256):
        if captioner.model_id.startswith("precomputed"):
            raise ModelError(
                "precomputed answers are looked up by catalog id and cannot describe an uploaded photo: "
                "describe uploads with a served MLLM (the openai or llava-hf backend)"
            )
        self.captioner, self.max_attempts, self.cache_size = captioner, max_attempts, cache_size
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.captioner.model_id

    def describe(self, raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
        key = hashlib.sha1(raw).hexdigest()
        with self._lock:
            if key in self._records:
                self._records.move_to_end(key)
                return self._records[key], None
        try:
            with tempfile.TemporaryDirectory(prefix="fashion-cir-upload-") as folder:
                path = Path(folder) / f"upload{SUFFIXES.get(Image.open(io.BytesIO(raw)).format or '', '.jpg')}"
                path.write_bytes(raw)
                result = caption_one(self.captioner, f"upload-{key[:12]}", path, self.max_attempts)
        except OSError as exc:
            result = {"status": "error", "error": f"the photo could not be handed over ({exc})"}
        if result["status"] != "ok":
            log.warning("the MLLM (%s) did not describe an upload: %s", self.model_id, result["error"])
            return (
                None,
                f"the MLLM ({self.model_id}) gave {FAILURES[result['status']]}; the attribute heads described the photo",
            )
        record = {name: value for name, value in result["attributes"].items() if name != "image"}
        with self._lock:
            self._records[key] = record
            while len(self._records) > self.cache_size:
                self._records.popitem(last=False)
        return record, None
