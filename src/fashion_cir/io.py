"""Small file helpers: atomic writes, JSON with clear errors, content hashes, run metadata."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DataError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one:
    a temporary file (mode 0666 minus the umask, like any new file) is fsynced, renamed over
    ``path``, and the folder fsynced so that the rename survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"could not write {path}: {exc.strerror or exc}") from exc


@contextmanager
def folder_lock(folder: str | Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder/name`` (waits for other processes and threads
    holding it); released when the block ends or the process dies, so a kill never leaves it stuck."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DataError(f"could not lock {folder / name}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    except RecursionError as exc:
        raise DataError(f"malformed {what} {path}: nested too deeply") from exc
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
            except RecursionError as exc:
                raise DataError(f"malformed {what} {path}, line {lineno}: nested too deeply") from exc
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
