"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class FashionCIRError(Exception):
    """An error caused by input or environment, with a message that says what to do."""


class DataError(FashionCIRError):
    """A data file, folder, field or value is missing or malformed."""


class ModelError(FashionCIRError):
    """A model cannot be built or loaded (unknown spec, missing weights, mismatched checkpoint)."""
