"""The one config style: every config (recipe, towers, triplets, stages, evaluation, index) is a
pydantic model read the same way, with one clear line naming the file and field on bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import DataError
from .io import read_json, write_json


def describe_validation_error(exc: ValidationError, source: str, what: str) -> str:
    """``source: invalid What: field.path: message (got VALUE); ...`` on one line."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        got = (
            f" (got {error['input']!r})"
            if error["type"] not in ("missing",) and not isinstance(error["input"], dict)
            else ""
        )
        problems.append(f"{where}: {error['msg']}{got}")
    return f"{source}: invalid {what}: " + "; ".join(problems)


class Config(BaseModel):
    """Base of every config: unknown fields are errors; ``from_json`` / ``from_dict`` raise a
    :class:`DataError` that names the file and the field."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_json(path, f"{cls.__name__} file"), str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config"):
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise DataError(describe_validation_error(exc, source, cls.__name__)) from None

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.model_dump(mode="json"))
