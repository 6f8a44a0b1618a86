"""Small file helpers: atomic writes, JSON with clear errors, content hashes, run metadata."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"could not write {path}: {exc.strerror or exc}") from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing file or a syntax error into a DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed {what} {path}: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text: {exc}") from exc


def iter_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[dict]:
    """Yield one object per non-empty line; a malformed line raises DataError with its number."""
    for _, obj in iter_jsonl_numbered(path, what):
        yield obj


def iter_jsonl_numbered(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """Like :func:`iter_jsonl`, yielding ``(line number, object)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{what} {path}, line {lineno}: not UTF-8 text") from exc
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed {what} {path}, line {lineno}: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise DataError(f"malformed {what} {path}, line {lineno}: expected an object")
            yield lineno, obj


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append whole lines and fsync, so an interrupted run leaves only complete records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def text_sha1(*parts: str) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def environment_info() -> dict[str, str]:
    """Versions recorded beside every output, for reproducibility."""
    from . import __version__

    info = {"fashion_cir": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for module in ("torch", "torchvision", "open_clip", "numpy", "faiss", "transformers"):
        mod = sys.modules.get(module)
        if mod is not None:
            info[module] = getattr(mod, "__version__", "unknown")
    return info
