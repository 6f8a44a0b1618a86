"""Append-only JSONL cache of captioning results, keyed by image content hash + model id + prompt
version. Lines are appended with fsync; a torn last line (a run killed mid-write) is cut off on open,
so a restarted run neither loses nor duplicates records."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import DataError
from ..io import append_jsonl, text_sha1

DONE_STATUSES = ("ok", "invalid")  # "error" records (request failures) are retried by the next run


class CaptionCache:
    """Records ``{"key", "image", "model", "prompt_version", "status", "attributes",
    "raw", "error", "attempts"}`` in ``cache_dir/<model>.<prompt_version>.jsonl``; the latest line per key wins."""

    def __init__(self, cache_dir: str | Path, model_id: str, prompt_version: str):
        self.model_id = model_id
        self.prompt_version = prompt_version
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-60:]
        self.path = Path(cache_dir) / f"{slug}.{prompt_version}.jsonl"

    def key(self, image_sha1: str) -> str:
        return text_sha1(image_sha1, self.model_id, self.prompt_version)

    def load(self) -> dict[str, dict]:
        """Latest record per key. Cuts a torn (unterminated) last line; a corrupt complete line is a DataError."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
        records: dict[str, dict] = {}
        for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"corrupt caption cache {self.path}, line {lineno}: {exc}; delete the line or the file") from exc
        return records

    def append(self, records: list[dict]) -> None:
        if records:
            append_jsonl(self.path, records)
