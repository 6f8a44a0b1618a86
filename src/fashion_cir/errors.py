"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

import pickle
from collections.abc import Mapping


class FashionCIRError(Exception):
    """An error caused by input or environment, with a message that says what to do."""


class DataError(FashionCIRError):
    """A data file, folder, field or value is missing or malformed."""


class ModelError(FashionCIRError):
    """A model cannot be built or loaded (unknown spec, missing weights, mismatched checkpoint)."""


def one_line(exc: BaseException) -> str:
    """An error's reason on one line (torch's refusals of pickled code run to paragraphs)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a tensor file torch.load can read safely (weights_only=True)"
    return " ".join(str(exc).split()) or type(exc).__name__


DEFAULT_MAX_FAILED_SHARE = 0.2  # the share of unreadable images a caption run, an index build or add tolerates


def check_failures(failures: Mapping[str, str], requested: int, max_share: float, what: str) -> None:
    """Raise DataError naming the first reasons when every one of ``requested`` items, or more than
    ``max_share`` of them, failed (``failures``: id -> reason)."""
    if failures and (len(failures) >= requested or len(failures) > max_share * requested):
        first = "; ".join(f"{key}: {reason}" for key, reason in list(failures.items())[:3])
        raise DataError(
            f"{len(failures)} of {requested} {what} failed (more than the allowed {max_share:.0%}); first: {first}"
        )
