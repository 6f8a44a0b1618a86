"""Attribute records as an integer matrix, for vectorised attribute differences over a catalog."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..captioning.schema import Attributes
from ..captioning.vocab import Vocabulary

WILDCARD = -1


@dataclass
class AttributeTable:
    """``codes[i, a]``: index of image i's value of attribute a in the vocabulary (``WILDCARD`` for
    unknown / not applicable); ``groups[i]``: category compatibility class (equal = may be paired)."""

    attributes: tuple[str, ...]
    codes: np.ndarray
    groups: np.ndarray

    @classmethod
    def build(cls, records: list[Attributes], attributes: tuple[str, ...], vocab: Vocabulary) -> AttributeTable:
        codes = np.full((len(records), len(attributes)), WILDCARD, dtype=np.int16)
        for a, name in enumerate(attributes):
            spec = vocab.attributes[name]
            index: dict[str | None, int] = {v: k for k, v in enumerate((*spec.values, None))}
            for i, record in enumerate(records):
                value = record[name]
                if not vocab.is_wildcard(name, value):
                    codes[i, a] = index[value]
        categories = vocab.attributes["category"].values
        group_of: dict[str | None, int | None] = {c: vocab.category_group(c) for c in categories}
        groups = np.array(
            [
                g if (g := group_of[r["category"]]) is not None else len(categories) + categories.index(r["category"])
                for r in records
            ],
            dtype=np.int32,
        )
        return cls(attributes, codes, groups)

    def differences(self, rows: np.ndarray, cols: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Boolean [len(rows), len(cols), A]: attribute a differs and neither side is a wildcard."""
        left = self.codes[rows][:, None, :]
        right = self.codes[cols][None, :, :]
        return (left != right) & (left != WILDCARD) & (right != WILDCARD)
