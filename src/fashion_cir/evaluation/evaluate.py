"""Evaluate a CIR model on FashionIQ-format triplet sets.

FashionIQ protocol: per category, the gallery is every image of the split and the reference is
NOT removed; report R@K per category and their average, overall = (avg R@10 + avg R@50) / 2.
``remove_reference`` gives the CIRR variant."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import Config
from ..data.captions import join_captions_val
from ..data.triplets import Triplet, TripletSet
from ..errors import DataError
from ..features.cache import FeatureCache
from ..models.cir import CIRModel
from ..retrieval.scorer import DenseGallery, catalog_item_vectors, compose_queries
from .metrics import DEFAULT_KS, add_overall, recall_at_k


class EvalOptions(Config):
    """How a set is scored: query modes, K values, reference removal, batching, prompt source."""

    modes: tuple[str, ...] = ("sum",)
    ks: tuple[int, ...] = DEFAULT_KS
    remove_reference: bool = False
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    describe: Literal["catalog", "predicted", "none"] = "catalog"  # reference descriptions in prompts: catalog, predicted (attribute heads) or none
    keep_ranks: bool = False  # add each query's 0-based target rank (for intervals and paired tests)


def default_descriptions(model: CIRModel, images: Path | None) -> Path | None:
    """Where descriptions come from when none are given: the file the model was trained with, else
    the catalog's ``attributes.jsonl`` beside its images folder, else none."""
    candidates = [model.descriptions_source, images.parent / "attributes.jsonl" if images is not None else None]
    return next((Path(c) for c in candidates if c is not None and Path(c).is_file()), None)


def predicted_descriptions(model: CIRModel, features: dict[str, np.ndarray]) -> dict[str, str]:
    """id -> description from the model's attribute heads over raw image features."""
    from ..models.attributes import describe

    ids = list(features)
    if not ids:
        return {}
    predicted = model.predict_attributes(torch.from_numpy(np.stack([features[i] for i in ids])))
    return {i: describe(p) for i, p in zip(ids, predicted)}


def reference_descriptions(triplets: list[Triplet], descriptions: dict[str, str] | None, describe: str) -> list[str | None]:
    """Each query's reference description: ``catalog``: the triplet's ``reference_prompt`` or
    ``descriptions[candidate]``; ``predicted``: ``descriptions[candidate]`` only (the attribute
    heads' phrases); ``none``: no description."""
    if describe == "none":
        return [None] * len(triplets)
    if describe == "predicted":
        return [(descriptions or {}).get(t.candidate) for t in triplets]
    return [t.reference_prompt or (descriptions or {}).get(t.candidate) for t in triplets]


class PreparedSet:
    """One set's queries composed and gallery encoded once; :meth:`metrics` ranks them in a query
    mode with the model as it is then (e.g. a matcher fusion weight changed in between)."""

    def __init__(self, model: CIRModel, triplet_set: TripletSet, cache: FeatureCache, options: EvalOptions,
                 descriptions: dict[str, str] | None = None):
        gallery_paths = {i: triplet_set.image_paths[i] for i in triplet_set.gallery_ids}
        extra_refs = {t.candidate: triplet_set.image_paths[t.candidate] for t in triplet_set.triplets if t.candidate not in gallery_paths}
        gallery_ids, gallery = cache.encode(model.backbone, gallery_paths, options.batch_size, options.num_workers,
                                            on_error="skip", progress=options.progress)
        failed = cache.last_stats.failed
        ref_ids, ref_feats = cache.encode(model.backbone, extra_refs, options.batch_size, options.num_workers,
                                          on_error="skip", progress=options.progress) if extra_refs else ([], gallery[:0])
        position = {image_id: i for i, image_id in enumerate(gallery_ids)}
        ref_lookup = {**{i: gallery[position[i]] for i in gallery_ids}, **dict(zip(ref_ids, ref_feats))}
        # a reference or gallery target that failed to decode drops the query (counted); a target outside
        # the split stays, as a query that cannot succeed
        triplets = [t for t in triplet_set.triplets
                    if t.candidate in ref_lookup and (t.target in position or t.target not in gallery_paths)]
        prompts = descriptions  # reference descriptions in prompts; gallery items keep the catalog's
        if options.describe == "predicted":
            prompts = predicted_descriptions(model, {t.candidate: ref_lookup[t.candidate] for t in triplets})
        image_feats = torch.from_numpy(np.stack([ref_lookup[t.candidate] for t in triplets])) if triplets else torch.zeros(0, gallery.shape[1])
        self.model, self.options, self.descriptions, self.cache_root = model, options, descriptions, cache.root
        self.queries = compose_queries(model, image_feats, [join_captions_val(list(t.captions)) for t in triplets],
                                       reference_descriptions(triplets, prompts, options.describe))
        self.gallery_ids, self.gallery = gallery_ids, torch.from_numpy(gallery)
        self.targets = [t.target for t in triplets]
        self.exclude = [t.candidate for t in triplets] if options.remove_reference else None
        self.counts = {"n_queries": len(triplets), "n_gallery": len(gallery_ids),
                       "missing": len(triplet_set.missing_images) + failed,
                       "skipped_triplets": triplet_set.skipped_triplets + len(triplet_set.triplets) - len(triplets)}

    def metrics(self, mode: str) -> dict:
        items = DenseGallery(self.gallery_ids, catalog_item_vectors(self.model, self.gallery, self.gallery_ids,
                                                                    self.descriptions, self.cache_root))
        ranks = items.target_ranks(self.queries.vectors(mode), self.targets, self.exclude)
        result = add_overall({**recall_at_k(ranks, self.options.ks), **self.counts})
        if self.options.keep_ranks:
            result["ranks"] = [int(r) for r in ranks]
        return result


def score_triplet_set(model: CIRModel, triplet_set: TripletSet, cache: FeatureCache, options: EvalOptions,
                      descriptions: dict[str, str] | None = None) -> dict[str, dict]:
    """Metrics per query mode for one triplet set (keys R@K, overall, n_queries, n_gallery, missing)."""
    prepared = PreparedSet(model, triplet_set, cache, options, descriptions)
    return {mode: prepared.metrics(mode) for mode in options.modes}


def evaluate_sets(model: CIRModel, sets: dict[str, TripletSet], cache: FeatureCache, options: EvalOptions,
                  descriptions: dict[str, str] | None = None) -> dict[str, dict]:
    """{mode: {category: metrics, ..., "average": {R@K..., "overall"}}} over several sets."""
    per_set = {name: score_triplet_set(model, s, cache, options, descriptions) for name, s in sets.items()}
    empty = [name for name in sets if per_set[name][options.modes[0]]["n_queries"] == 0]
    if len(empty) == len(sets):
        raise DataError(f"no usable query in {', '.join(sets)}: every triplet lacks its reference or target image")
    report: dict[str, dict] = {}
    for mode in options.modes:
        table = {name: per_set[name][mode] for name in sets}
        scored = [m for name, m in table.items() if name not in empty]  # an empty set is reported, not averaged
        average = {f"R@{k}": float(np.mean([m[f"R@{k}"] for m in scored])) for k in options.ks}
        average["n_queries"] = sum(m["n_queries"] for m in table.values())
        average["n_gallery"] = sum(m["n_gallery"] for m in table.values())
        average["missing"] = sum(m["missing"] for m in table.values())
        add_overall(average)
        if empty:
            average["sets_without_queries"] = empty
        report[mode] = {**table, "average": average}
    return report


def format_table(report: dict[str, dict], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """A plain-text table: one row per (mode, category)."""
    header = f"{'mode':<10}{'set':<14}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'queries':>9}{'gallery':>9}{'missing':>9}"
    lines = [header, "-" * len(header)]
    for mode, table in report.items():
        for name, metrics in table.items():
            lines.append(f"{mode:<10}{name:<14}" + "".join(f"{metrics[f'R@{k}']:>8.2f}" for k in ks)
                         + f"{metrics['n_queries']:>9}{metrics['n_gallery']:>9}{metrics['missing']:>9}")
    return "\n".join(lines)
