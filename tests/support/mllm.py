"""The fake chat-completions server (``fake_openai_server.py`` beside this module) in a process of
its own, for tests that talk to an MLLM over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "fake_openai_server.py"


@contextmanager
def fake_mllm(
    folder: Path, behaviours: Mapping[str, str] | None = None, key: str = "key", name: str = "requests"
) -> Iterator[tuple[str, Path]]:
    """Yields (the server's API root, ending in /v1; ``folder/name.jsonl``, the log of its requests).
    ``behaviours`` maps the sha1 of an image's base64 payload (or "default": any other image) to ok,
    fenced, slow_once, error500_once, garbage or bad_body (default ok); ``key`` is the API key it
    expects."""
    behaviours_file = folder / f"{name}.behaviours.json"
    behaviours_file.write_text(json.dumps(dict(behaviours or {})))
    log = folder / f"{name}.jsonl"
    process = subprocess.Popen(
        [sys.executable, str(SERVER), str(behaviours_file), key, str(log)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        yield f"http://127.0.0.1:{int(process.stdout.readline())}/v1", log
    finally:
        process.terminate()
        process.wait(timeout=10)
