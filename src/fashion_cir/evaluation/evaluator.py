"""The evaluator: scores a model on named validation sets, owns the primary metric and the
selection rule (as sentence-transformers' evaluators own ``primary_metric``), and keeps each
result in a content-keyed cache so that scoring the same model on the same sets twice is free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Config
from ..data.triplets import TripletSet
from ..errors import FashionCIRError
from ..features.cache import FeatureCache
from ..io import atomic_write_text, text_sha1
from ..models.cir import CIRModel
from .evaluate import EvalOptions, PreparedSet, evaluate_sets

RESULTS_FORMAT = "fashion-cir-eval/2"  # part of every cache key: one mode's table per file


class Selection(Config):
    """Which figure picks the best model: ``metric`` of validation set ``set`` (None: the average
    over the sets); overall = (R@10 + R@50) / 2."""

    set: str | None = Field(None, description="validation set to select on; None = average over the sets")
    metric: Literal["overall", "R@1", "R@5", "R@10", "R@50"] = "overall"


class Evaluator:
    """Scores models on ``sets`` (one protocol: the same galleries for every model)."""

    def __init__(self, sets: dict[str, TripletSet], cache: FeatureCache, descriptions: dict[str, str] | None = None,
                 options: EvalOptions | None = None, selection: Selection | None = None,
                 results_dir: str | Path | None = None):
        self.sets = sets
        self.cache = cache
        self.descriptions = descriptions
        self.options = options or EvalOptions(progress=False)
        self.selection = selection or Selection()
        if self.selection.set is not None and self.selection.set not in sets:
            raise FashionCIRError(f"selection set {self.selection.set!r} is not a validation set ({sorted(sets)})")
        self.results_dir = Path(results_dir) if results_dir is not None else None
        self._sets_key = text_sha1(*(f"{name}|{','.join(s.gallery_ids)}|" + ";".join(
            f"{t.candidate}>{t.target}:{'|'.join(t.captions)}:{t.reference_prompt or ''}" for t in s.triplets)
            for name, s in sorted(sets.items())))
        self._descriptions_key = text_sha1(*(f"{k}={v}" for k, v in sorted((descriptions or {}).items())))

    def __call__(self, model: CIRModel, modes: tuple[str, ...] | None = None, describe: str | None = None) -> dict[str, dict]:
        """{mode: {set: metrics, ..., "average": metrics}} (default: the model's query mode). Each
        mode's table is cached on its own; the modes not cached yet are scored together."""
        options = self.options.model_copy(update={"modes": tuple(modes or (model.query_mode,)),
                                                   **({"describe": describe} if describe else {})})
        paths: dict[str, Path] = {}
        report: dict[str, dict] = {}
        if self.results_dir is not None:
            fingerprint = model.fingerprint()
            for mode in options.modes:
                single = options.model_copy(update={"modes": (mode,)})
                key = text_sha1(RESULTS_FORMAT, fingerprint, self._sets_key, self._descriptions_key,
                                single.model_dump_json(exclude={"progress", "num_workers", "batch_size"}))
                paths[mode] = self.results_dir / f"{key}.json"
                if paths[mode].is_file():
                    report[mode] = json.loads(paths[mode].read_text(encoding="utf-8"))
        missing = tuple(m for m in options.modes if m not in report)
        if missing:
            fresh = evaluate_sets(model, self.sets, self.cache, options.model_copy(update={"modes": missing}), self.descriptions)
            for mode, table in fresh.items():
                report[mode] = table
                if mode in paths:
                    paths[mode].parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(paths[mode], json.dumps(table))
        return {mode: report[mode] for mode in options.modes}

    def primary(self, table: dict[str, dict]) -> float:
        """The selection figure of one mode's table ({set: metrics, "average": ...})."""
        return float(table[self.selection.set or "average"][self.selection.metric])

    def calibrate(self, model: CIRModel, weights: list[float]) -> dict[float, float]:
        """The selection figure of ``model`` (its query mode) at each matcher fusion weight; the
        queries are composed once, since only the fusion changes with the weight. The model is left
        with its matcher's weight as it was."""
        names = [self.selection.set] if self.selection.set else list(self.sets)
        options = self.options.model_copy(update={"keep_ranks": False})
        prepared = {name: PreparedSet(model, self.sets[name], self.cache, options, self.descriptions) for name in names}
        original, scores = model.matcher.weight, {}
        for weight in weights:
            model.matcher.weight = weight
            tables = {name: p.metrics(model.query_mode) for name, p in prepared.items()}
            scores[weight] = float(sum(t[self.selection.metric] for t in tables.values()) / len(tables))
        model.matcher.weight = original
        return scores

    @staticmethod
    def select(scores: dict[str, float]) -> str:
        """The best candidate: highest score, the earlier one on a tie."""
        return max(scores, key=lambda name: (scores[name], -list(scores).index(name)))
