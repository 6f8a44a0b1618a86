"""Precomputed attributes: a JSONL file with one ``{"image": id, <attributes>, "kids", "description"}``
object per line (the layout of the clothing catalog's attributes.jsonl and of ``write_attributes``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.catalog import read_attribute_records, read_attributes
from ..errors import DataError
from ..io import atomic_write_text, file_sha1
from .base import Captioner, CaptionRequest, RequestFailed
from .schema import Attributes, InvalidAnswer, validate_attributes
from .vocab import DEFAULT_VOCABULARY, Vocabulary


def load_precomputed(path: str | Path, vocab: Vocabulary = DEFAULT_VOCABULARY) -> dict[str, Attributes]:
    """Read and validate an attributes JSONL file; any invalid record is a DataError naming file and line."""
    path = Path(path)
    attributes = {}
    for image_id, (lineno, obj) in read_attribute_records(path).items():
        try:
            attributes[image_id] = validate_attributes(obj, vocab)
        except InvalidAnswer as exc:
            raise DataError(f"malformed attributes file {path}, line {lineno} ({image_id}): {exc}") from exc
    return attributes


def write_attributes(path: str | Path, attributes: dict[str, Attributes]) -> None:
    """Write id -> ``Attributes`` as an attributes JSONL file (atomically), readable by ``load_precomputed``."""
    atomic_write_text(path, "".join(json.dumps(a.to_record(i)) + "\n" for i, a in attributes.items()))


class PrecomputedCaptioner(Captioner):
    """Answers with the stored record of each image id (so stored output goes through the same
    validation and cache as a live model); an id without a record is a request failure."""

    batch_size = 256

    def __init__(self, path: str | Path, vocab: Vocabulary = DEFAULT_VOCABULARY):
        super().__init__(vocab)
        self.path = Path(path)
        self._records = read_attributes(self.path)
        self.model_id = f"precomputed-{file_sha1(self.path)[:12]}"

    def answer(self, requests: list[CaptionRequest]) -> list[str | RequestFailed]:
        return [
            json.dumps(self._records[r.image_id])
            if r.image_id in self._records
            else RequestFailed(f"no record for image {r.image_id!r} in {self.path}")
            for r in requests
        ]
