"""``TripletConfig``: every knob of triplet generation, saved beside the generated triplets."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, model_validator

from ..captioning.vocab import DEFAULT_VOCABULARY, Vocabulary
from ..config import Config


class TripletConfig(Config):
    """Pair mining, caption and hard-negative settings.

    ``band``: targets of a reference come from this band of its static-feature neighbours, in
    ``band_unit`` = "quantile" (fractions of the pool, e.g. (0.005, 0.3)) or "rank" (e.g. (10, 1500));
    SPN4CIR used ranks 10,000-20,000 of 46k. Within the band a target must differ from the reference in
    ``min_changes``..``max_changes`` of ``attributes`` (None: all vocabulary attributes), changing category
    only inside a ``vocabulary.compatible_categories`` group. ``change_only_share`` of the triplets get
    change-only captions ("same but darker", no garment type unless it changes) instead of relative ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    band: tuple[float, float] = (0.005, 0.3)
    band_unit: Literal["quantile", "rank"] = "quantile"
    min_changes: int = 1
    max_changes: int = 3
    targets_per_reference: int = 2
    max_triplets: int | None = None
    attributes: tuple[str, ...] | None = None
    hard_negatives: int = 10
    change_only_share: float = 0.0
    vocabulary: Vocabulary = DEFAULT_VOCABULARY

    @model_validator(mode="after")
    def _check(self) -> TripletConfig:
        low, high = self.band
        if not 0 <= low < high or (self.band_unit == "quantile" and high > 1):
            raise ValueError(f"band must be 0 <= low < high (<= 1 for quantiles), got {self.band}")
        if not 1 <= self.min_changes <= self.max_changes:
            raise ValueError("need 1 <= min_changes <= max_changes")
        if not 0 <= self.change_only_share <= 1:
            raise ValueError(f"change_only_share must be within [0, 1], got {self.change_only_share}")
        if self.targets_per_reference < 1 or self.hard_negatives < 0:
            raise ValueError("targets_per_reference must be >= 1 and hard_negatives >= 0")
        unknown = set(self.attributes or ()) - set(self.vocabulary.names)
        if unknown:
            raise ValueError(f"attributes not in the vocabulary: {sorted(unknown)}")
        return self

    @property
    def compared_attributes(self) -> tuple[str, ...]:
        """Attributes whose differences count (category always does: a category change is a change)."""
        names = self.attributes or self.vocabulary.names
        return names if "category" in names else ("category", *names)
