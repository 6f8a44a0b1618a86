"""Split a batch job (feature extraction, captioning) across processes or machines.

Every process gets the same item list and takes its shard: ``--shard I/N`` (0 <= I < N), or the
``RANK`` / ``WORLD_SIZE`` that torchrun sets. Shards are strided over the sorted ids, so each
item belongs to exactly one shard whatever the order it was listed in. The workers write into one
content-keyed cache under names unique to each writer; a feature cache's parts are then merged
into one file with :func:`merge_feature_parts` (run it when no worker is writing)."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_write_bytes


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> this process's torchrun rank (RANK/WORLD_SIZE) or (0, 1)."""
    if text is None:
        try:
            return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError as exc:
            raise DataError(f"bad RANK/WORLD_SIZE in the environment: {exc}") from exc
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise DataError(f"bad shard {text!r}: expected I/N, e.g. 0/4 (the first of four)")
    index_number, count_number = int(index), int(count)
    if count_number < 1 or index_number >= count_number:
        raise DataError(f"bad shard {text!r}: need 0 <= I < N")
    return index_number, count_number


def select_shard(ids: Iterable[str], index: int, count: int) -> list[str]:
    """The ids of shard ``index`` of ``count``: every ``count``-th of the sorted ids."""
    return sorted(ids)[index::count]


def merge_feature_parts(folder: str | Path) -> dict[str, int]:
    """Merge every ``part-*.npz`` of one feature-cache folder (``ROOT/<trunk fingerprint>``) into a
    single part, keeping one row per (id, sha1); the inputs are removed only after the merged
    part is written atomically. Returns counts of parts, rows and unique rows."""
    folder = Path(folder)
    parts = sorted(folder.glob("part-*.npz"))
    if not parts:
        raise DataError(f"no feature cache parts (part-*.npz) in {folder}")
    ids: list[str] = []
    shas: list[str] = []
    features: list[np.ndarray] = []
    seen: set[tuple[str, str]] = set()
    rows = 0
    for part in parts:
        try:
            with np.load(part, allow_pickle=False) as data:
                for image_id, sha, feature in zip(data["ids"], data["sha1"], data["features"]):
                    rows += 1
                    key = (str(image_id), str(sha))
                    if key not in seen:
                        seen.add(key)
                        ids.append(key[0])
                        shas.append(key[1])
                        features.append(feature)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot read feature cache part {part}: {exc}; move it aside and merge again") from exc
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.array(ids), sha1=np.array(shas), features=np.stack(features).astype(np.float16))
    merged = folder / f"part-merged-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
    atomic_write_bytes(merged, buffer.getvalue())
    for part in parts:
        part.unlink(missing_ok=True)
    return {"parts": len(parts), "rows": rows, "unique": len(ids)}
