"""Append-only JSONL cache of captioning results, keyed by image content hash + model id + prompt
version. Lines are appended with fsync; a torn last line (a run killed mid-write) is cut off on open,
so a restarted run neither loses nor duplicates records. A sharded run (``caption --shard I/N``)
appends to its own file ``<model>.<prompt_version>.shard-I-of-N.jsonl``; every run reads all of them,
so an unsharded run afterwards merges the shards' answers without asking again."""

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

    def __init__(self, cache_dir: str | Path, model_id: str, prompt_version: str, shard: tuple[int, int] = (0, 1)):
        self.model_id = model_id
        self.prompt_version = prompt_version
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-60:]
        self.stem = Path(cache_dir) / f"{slug}.{prompt_version}"
        index, count = shard
        suffix = f".shard-{index}-of-{count}" if count > 1 else ""
        self.path = self.stem.with_name(f"{self.stem.name}{suffix}.jsonl")

    def key(self, image_sha1: str) -> str:
        return text_sha1(image_sha1, self.model_id, self.prompt_version)

    def files(self) -> list[Path]:
        """This cache's files: the unsharded one and every shard's."""
        main = self.stem.with_name(f"{self.stem.name}.jsonl")
        shards = sorted(self.stem.parent.glob(f"{self.stem.name}.shard-*-of-*.jsonl"))
        return [path for path in [main, *shards] if path.is_file()]

    def load(self) -> dict[str, dict]:
        """Latest record per key over every file; a finished record ("ok"/"invalid") is never
        replaced by an unfinished one from another file. Cuts a torn (unterminated) last line of
        this writer's own file (another writer's unterminated line is only skipped); a corrupt
        complete line is a DataError."""
        records: dict[str, dict] = {}
        for path in self.files():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data) and path == self.path:
                with path.open("r+b") as handle:
                    handle.truncate(end)
                    handle.flush()
                    os.fsync(handle.fileno())
            for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = record["key"]
                    old = records.get(key)
                    if old is None or record["status"] in DONE_STATUSES or old["status"] not in DONE_STATUSES:
                        records[key] = record
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(
                        f"corrupt caption cache {path}, line {lineno}: {exc}; delete the line or the file"
                    ) from exc
        return records

    def append(self, records: list[dict]) -> None:
        if records:
            append_jsonl(self.path, records)
