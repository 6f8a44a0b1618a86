"""A recipe: one typed file that says what ``fashion-cir run`` does, step by step (see
:mod:`fashion_cir.pipeline.runner`): the catalog, the towers, captioning, triplet generation, the
zero-shot baselines, the training stages, evaluation and selection, attribute heads, the index and
the pictures. Paths may use environment variables (``${FASHIONIQ_ROOT}``); relative paths are
relative to the working directory. ``profiles`` hold named overrides (e.g. ``fast``)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import Config
from ..errors import DEFAULT_MAX_FAILED_SHARE, DataError, FashionCIRError
from ..evaluation.evaluator import Selection
from ..io import read_json
from ..training.align import AlignConfig
from ..training.config import Stage1Config, Stage2Config
from ..training.fusion import FusionConfig
from ..triplets.config import TripletConfig


def expand_path(path: str) -> str:
    """``~`` and environment variables expanded; an unset variable is an error that names it."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise FashionCIRError(f"path {path!r} uses unset environment variable(s) {', '.join(unset)}; export them first")
    return expanded


class TripletSource(Config):
    """A FashionIQ-format caption file with its image split (and, optionally, its own images folder)."""

    captions: str
    split: str
    name: str | None = None


class CatalogSpec(Config):
    """The image catalog: an images folder, split files (several per split are joined, e.g.
    FashionIQ's categories), the MLLM attributes file and optional labels."""

    images: str
    splits: dict[str, list[str]] = Field(description="split name -> split files (JSON lists of ids)")
    attributes: str | None = Field(None, description="attributes.jsonl (made by the caption step when it is missing)")
    labels: str | None = Field(None, description="CSV with 'image' and 'label' columns")
    slice: dict[str, int] | None = Field(None, description="keep the first N ids of each split (smoke runs)")


class CaptionSpec(Config):
    """Describe every catalog image with a multimodal LLM (attributes + description)."""

    backend: Literal["llava-hf", "openai", "precomputed"] = "llava-hf"
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="backend options (batch_size, base_url, ...)")
    max_attempts: int = Field(3, ge=1)
    max_failed_share: float = Field(
        DEFAULT_MAX_FAILED_SHARE, ge=0, le=1, description="stop when more than this share of the images fail"
    )


class TowerSpec(Config):
    """The backbone (a :func:`~fashion_cir.models.factory.create_backbone` spec) and, for the
    offline towers, the projection alignment on the train split."""

    backbone: str = "offline"
    preprocess: Literal["clip", "targetpad"] = "clip"
    align: AlignConfig | None = None


class MatcherSpec(Config):
    spec: str = "minilm"


class ModelSpec(Config):
    """What models read: the query mode of the image side, the text tower's template, a Combiner,
    the description matcher (items read by their descriptions too) and attribute matching."""

    query_mode: str = "sum"
    text_template: Literal["prompt", "caption"] = "prompt"
    combiner: bool = False
    matcher: MatcherSpec | None = None
    attributes: bool = Field(False, description="match items' attributes against the caption's changes")


class FusionSpec(Config):
    """Fitting the fusion weights of the baselines marked ``fused`` on annotated training captions
    (gallery: the train split, reference left out); stages keep their start model's weights."""

    sets: list[str] | None = Field(None, description="annotated training sources to fit on (None: all)")
    config: FusionConfig = Field(default_factory=FusionConfig)


class Variant(Config):
    label: str
    text_template: Literal["prompt", "caption"]
    modes: list[str]


class BaselineSpec(Config):
    """An untrained model: its best variant x mode on the selection figure is published."""

    name: str
    matcher: bool = Field(False, description="with the recipe's description matcher and attribute matching")
    fused: bool = Field(False, description="fusion weights fitted on the training captions (see FusionSpec)")
    variants: list[Variant]


class StageSpec(Config):
    name: str
    kind: Literal["stage1", "stage2"]
    start: str = Field(description="the published model it starts from (a baseline or an earlier stage)")
    data: list[Literal["annotated", "generated"]] = Field(default=["annotated", "generated"])  # copied per instance
    refit_fusion: bool = Field(
        False,
        description="fit the trained model's fusion weights again (on the annotated "
        "training captions: train on generated data alone then)",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Stage1Config / Stage2Config fields")

    @model_validator(mode="after")
    def _check_config(self):
        try:
            self.train_config()
        except DataError as exc:  # reported by the recipe, with its file and field path
            raise ValueError(str(exc)) from None
        return self

    def train_config(self, **update: Any) -> Stage1Config | Stage2Config:
        cls = Stage1Config if self.kind == "stage1" else Stage2Config
        return cls.from_dict({**self.config, **update}, f"stage {self.name!r} config")


class EvaluationSpec(Config):
    val: list[TripletSource] = Field(default_factory=list, description="annotated validation sets")
    generated_val: bool = Field(False, description="also score the generated val triplets (set 'generated-val')")
    protocols: list[Literal["split", "catalog"]] = Field(default=["split"])  # copied per instance
    selection: Selection = Field(default_factory=Selection)
    reliance: bool = Field(False, description="also score every model with shuffled references (reference reliance)")
    compare: list[tuple[str, str]] = Field(
        default_factory=list, description="paired differences (a - b); 'best-baseline' names the best untrained model"
    )


class IndexSpec(Config):
    splits: list[str]
    factory: str = "Flat"


class Recipe(Config):
    name: str
    out: str
    seed: int = 0
    catalog: CatalogSpec
    caption: CaptionSpec | None = None
    towers: TowerSpec = Field(default_factory=TowerSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    annotated: list[TripletSource] = Field(default_factory=list, description="annotated training triplets")
    generate: dict[str, TripletConfig] = Field(default_factory=dict, description="split -> triplet generation settings")
    generated: list[TripletSource] = Field(
        default_factory=list, description="generated training triplets made elsewhere"
    )
    baselines: list[BaselineSpec] = Field(default_factory=list)
    stage_defaults: dict[str, Any] = Field(default_factory=dict, description="config fields every stage shares")
    stages: list[StageSpec] = Field(default_factory=list)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    attribute_heads: bool = False
    index: IndexSpec | None = None
    pictures: bool = True
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named overrides")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        """``stage_defaults`` under every stage's config, and the recipe's ``seed`` wherever a
        step's settings name none (stages, triplet generation, alignment)."""
        if not isinstance(raw, dict):
            return raw
        raw = copy.deepcopy(raw)
        seed = raw.get("seed", 0)
        shared = {"seed": seed, **(raw.get("stage_defaults") or {})}
        for stage in raw.get("stages") or []:
            if isinstance(stage, dict):
                stage["config"] = {**shared, **(stage.get("config") or {})}
        for settings in (raw.get("generate") or {}).values():
            if isinstance(settings, dict):
                settings.setdefault("seed", seed)
        towers = raw.get("towers")
        if isinstance(towers, dict) and isinstance(towers.get("align"), dict):
            towers["align"].setdefault("seed", seed)
        return raw

    @model_validator(mode="after")
    def _check_names(self):
        known = [b.name for b in self.baselines]
        for stage in self.stages:
            if stage.start not in known:
                raise ValueError(
                    f"stage {stage.name!r} starts from {stage.start!r}, which is not an earlier model ({known})"
                )
            known.append(stage.name)
        if len(set(known)) != len(known):
            raise ValueError(f"model names must be unique: {known}")
        for a, b in self.evaluation.compare:
            for name in (a, b):
                if name not in known and name != "best-baseline":
                    raise ValueError(f"compare names unknown model {name!r} ({known})")
        if (
            "generated" in {d for s in self.stages for d in s.data}
            and "train" not in self.generate
            and not self.generated
        ):
            raise ValueError(
                "a stage trains on generated triplets but there is no 'generate.train' entry nor 'generated' file"
            )
        return self


def parse_override(text: str) -> dict:
    """``a.b.c=VALUE`` (VALUE as JSON, else a string) -> {"a": {"b": {"c": VALUE}}}."""
    if "=" not in text:
        raise DataError(f"override {text!r} is not KEY=VALUE (e.g. stages.0.config.epochs=2 or out=runs/x)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _apply(raw: dict, update: dict) -> dict:
    """Like :func:`merge`, but numeric keys index into lists (``stages.0.config.epochs``)."""
    for key, value in update.items():
        if isinstance(raw, list):
            index = int(key)
            raw[index] = _apply(raw[index], value) if isinstance(value, dict) else value
        elif isinstance(value, dict) and isinstance(raw.get(key), (dict, list)):
            raw[key] = _apply(raw[key], value)
        else:
            raw[key] = value
    return raw


def load_recipe(path: str | Path, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe, apply a named profile then ``KEY=VALUE`` overrides, and validate it."""
    raw = read_json(path, "recipe")
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a recipe is a JSON object")
    if profile is not None:
        profiles = raw.get("profiles", {})
        if profile not in profiles:
            raise DataError(f"{path}: no profile {profile!r} (profiles: {sorted(profiles) or 'none'})")
        raw = _apply(copy.deepcopy(raw), profiles[profile])
    for text in overrides:
        raw = _apply(raw, parse_override(text))
    return Recipe.from_dict(raw, str(path))
