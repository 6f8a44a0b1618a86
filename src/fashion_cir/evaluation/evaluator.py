"""The evaluator: scores a model on named validation sets under its protocols, owns the selection
rule (as sentence-transformers' evaluators own ``primary_metric``), and keeps each result in a
content-keyed cache so that scoring the same model on the same sets twice is free."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..config import Config
from ..data.triplets import TripletSet
from ..errors import FashionCIRError
from ..features.cache import FeatureCache
from ..io import atomic_write_text, text_sha1
from ..models.cir import CIRModel
from .evaluate import SPLIT, EvalOptions, PreparedSet, Protocol, average_table

RESULTS_FORMAT = "fashion-cir-eval/3"  # part of every cache key: one protocol x mode table per file


class Selection(Config):
    """Which figure picks the best model, epoch or variant: ``metric`` averaged over ``sets`` (None:
    every set) and ``protocols`` (None: every protocol scored); overall = (R@10 + R@50) / 2. The
    higher figure wins; on a tie the earlier candidate stays."""

    sets: list[str] | None = Field(None, description="validation sets to select on; None = all of them")
    metric: Literal["overall", "R@1", "R@5", "R@10", "R@50"] = "overall"
    protocols: list[str] | None = Field(None, description="protocols to select on; None = all of them")

    def figure(self, report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> float:
        """The figure of one mode's ``{protocol: {set: metrics}}``."""
        protocols = self.protocols or list(report)
        values = [report[p][s][self.metric] for p in protocols for s in (self.sets or _sets(report[p]))]
        return float(np.mean(values))

    @staticmethod
    def best(scores: Mapping[str, float]) -> str:
        """The candidate with the highest figure; the earlier one on a tie."""
        names = list(scores)
        return max(names, key=lambda name: (scores[name], -names.index(name)))

    @staticmethod
    def improves(figure: float, best_so_far: float | None) -> bool:
        """Whether a later candidate's figure replaces the best so far (ties keep the earlier)."""
        return best_so_far is None or figure > best_so_far


def _sets(table: Mapping[str, Any]) -> list[str]:
    return [name for name in table if name != "average"]


class Evaluator:
    """Scores models on ``sets`` under ``protocols`` (the same galleries for every model)."""

    def __init__(
        self,
        sets: dict[str, TripletSet],
        cache: FeatureCache,
        records: Mapping[str, Mapping] | None = None,
        options: EvalOptions | None = None,
        selection: Selection | None = None,
        results_dir: str | Path | None = None,
        protocols: Sequence[Protocol] = (SPLIT,),
    ):
        self.sets = sets
        self.cache = cache
        self.records = records
        self.options = options or EvalOptions(progress=False)
        self.selection = selection or Selection()
        self.protocols = list(protocols)
        unknown = [s for s in self.selection.sets or () if s not in sets]
        unknown += [p for p in self.selection.protocols or () if p not in {q.name for q in self.protocols}]
        if unknown:
            raise FashionCIRError(
                f"selection names {unknown}, which are not validation sets ({sorted(sets)}) "
                f"or protocols ({[p.name for p in self.protocols]})"
            )
        self.results_dir = Path(results_dir) if results_dir is not None else None
        self.key = text_sha1(
            *(
                f"{name}|{','.join(s.gallery_ids)}|"
                + ";".join(
                    f"{t.candidate}>{t.target}:{'|'.join(t.captions)}:{t.reference_prompt or ''}" for t in s.triplets
                )
                for name, s in sorted(sets.items())
            ),
            *(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted((records or {}).items())),
            *(f"{p.name}:{p.remove_reference}:{','.join(p.gallery_ids or ())}" for p in self.protocols),
        )

    def __call__(
        self,
        model: CIRModel,
        modes: Sequence[str] | None = None,
        describe: str | None = None,
        reliance: bool | None = None,
    ) -> dict[str, dict[str, dict]]:
        """{protocol: {mode: {set: metrics, ..., "average": metrics}}} (default mode: the model's).
        Each (protocol, mode) table is cached on its own; what is missing is scored in one pass."""
        update: dict[str, Any] = {"modes": tuple(modes or (model.query_mode,))}
        if describe:
            update["describe"] = describe
        if reliance is not None:
            update["reliance"] = reliance
        options = self.options.model_copy(update=update)
        paths: dict[tuple[str, str], Path] = {}
        report: dict[str, dict[str, dict]] = {p.name: {} for p in self.protocols}
        if self.results_dir is not None:
            fingerprint = model.fingerprint()
            # a table scored with reliance also serves a request without it
            settings = options.model_dump_json(exclude={"progress", "num_workers", "batch_size", "modes", "reliance"})
            for protocol in self.protocols:
                for mode in options.modes:
                    key = text_sha1(RESULTS_FORMAT, fingerprint, self.key, settings, protocol.name, mode)
                    paths[protocol.name, mode] = path = self.results_dir / f"{key}.json"
                    if path.is_file():
                        table = json.loads(path.read_text(encoding="utf-8"))
                        if not options.reliance or "reliance" in table["average"]:
                            report[protocol.name][mode] = table
        if any(mode not in report[p.name] for p in self.protocols for mode in options.modes):
            prepared = self.prepare(model, options)
            for protocol in self.protocols:
                for mode in options.modes:
                    if mode in report[protocol.name]:
                        continue
                    table = average_table(
                        {name: p.metrics(protocol.name, mode) for name, p in prepared.items()}, options.ks
                    )
                    report[protocol.name][mode] = table
                    if (protocol.name, mode) in paths:
                        paths[protocol.name, mode].parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(paths[protocol.name, mode], json.dumps(table))
        return report

    def prepare(
        self, model: CIRModel, options: EvalOptions | None = None, all_terms: bool = False
    ) -> dict[str, PreparedSet]:
        """Every set's queries composed and galleries encoded (for scoring under several fusions)."""
        options = options or self.options
        return {
            name: PreparedSet(model, s, self.cache, options, self.records, self.protocols, all_terms)
            for name, s in self.sets.items()
        }

    def figure(self, report: Mapping[str, Mapping[str, Mapping]], mode: str) -> float:
        """The selection figure of ``mode`` in a report of :meth:`__call__`."""
        return self.selection.figure({protocol: by_mode[mode] for protocol, by_mode in report.items()})
