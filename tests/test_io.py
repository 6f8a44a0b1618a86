"""Atomic writes (fashion_cir/io.py): the files they leave honour the umask, and they fsync the file
and its folder (an index save too)."""

from __future__ import annotations

import os
import stat

import pytest

from fashion_cir.io import atomic_write_bytes
from fashion_cir.retrieval import build_index


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """Issue 12 item 4: mkstemp left every atomically written file 0600."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "index.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "index.json").stat().st_mode) == mode


def test_atomic_writes_and_index_saves_fsync_files_and_folders(tmp_path, monkeypatch, tiny_model, drawings):
    """Issue 12 item 11: no directory was fsynced after a rename."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert synced == ["file", "dir"]
    synced.clear()
    build_index(tmp_path / "index", tiny_model, dict(list(drawings[0].items())[:4]), progress=False)
    # the data folder's 5 files, the data folder, the index folder after the rename, index.json and its folder
    assert synced.count("file") >= 6 and synced.count("dir") >= 3
