"""Precomputed attributes: a JSONL file with one ``{"image": id, <attributes>, "kids", "description"}``
object per line (the layout of the clothing catalog's attributes.jsonl and of ``write_attributes``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_text, file_sha1
from .base import Captioner, CaptionRequest, RequestFailed
from .schema import Attributes, InvalidAnswer, validate_attributes
from .vocab import DEFAULT_VOCABULARY, Vocabulary


def _records(path: Path) -> dict[str, tuple[int, dict]]:
    """id -> (line number, raw object); DataError naming file and line for bad or duplicate ids."""
    if not path.is_file():
        raise DataError(f"attributes file not found: {path}")
    records: dict[str, tuple[int, dict]] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed attributes file {path}, line {lineno}: {exc.msg}") from exc
            image_id = obj.get("image") if isinstance(obj, dict) else None
            if not isinstance(image_id, str) or not image_id:
                raise DataError(f"malformed attributes file {path}, line {lineno}: expected an object with a non-empty 'image' id")
            if image_id in records:
                raise DataError(f"malformed attributes file {path}, line {lineno}: duplicate image id {image_id!r} "
                                f"(first on line {records[image_id][0]})")
            records[image_id] = (lineno, obj)
    return records


def load_precomputed(path: str | Path, vocab: Vocabulary = DEFAULT_VOCABULARY) -> dict[str, Attributes]:
    """Read and validate an attributes JSONL file; any invalid record is a DataError naming file and line."""
    path = Path(path)
    attributes = {}
    for image_id, (lineno, obj) in _records(path).items():
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
        self._records = {image_id: obj for image_id, (_, obj) in _records(self.path).items()}
        self.model_id = f"precomputed-{file_sha1(self.path)[:12]}"

    def answer(self, requests: list[CaptionRequest]) -> list[str | RequestFailed]:
        return [
            json.dumps(self._records[r.image_id]) if r.image_id in self._records
            else RequestFailed(f"no record for image {r.image_id!r} in {self.path}")
            for r in requests
        ]
