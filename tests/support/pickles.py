"""A crafted checkpoint for the refused-pickle tests: unpickling it calls ``Path.touch`` on a
witness file, so a test can tell whether loading ran code from it."""

from __future__ import annotations

from pathlib import Path

import torch

REFUSED = "not a tensor file torch.load can read safely (weights_only=True)"  # the one-line reason


class _TouchOnLoad:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def crafted_checkpoint(path: Path, witness: Path) -> Path:
    """Write ``path``: a state dict whose one entry would touch ``witness`` when unpickled."""
    torch.save({"weight": torch.zeros(2), "payload": _TouchOnLoad(witness)}, path)
    return path
