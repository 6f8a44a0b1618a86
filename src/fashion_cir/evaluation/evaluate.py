"""Evaluate a CIR model on FashionIQ-format triplet sets.

FashionIQ protocol: per category, the gallery is every image of the split and the reference is
NOT removed; report R@K per category and their average, overall = (avg R@10 + avg R@50) / 2.
``remove_reference`` gives the CIRR variant."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.captions import join_captions_val
from ..data.triplets import Triplet, TripletSet
from ..errors import DataError
from ..features.cache import FeatureCache
from ..models.cir import CIRModel
from ..models.matcher import DescriptionBank
from .metrics import DEFAULT_KS, recall_at_k, target_ranks


@dataclass
class EvalOptions:
    modes: tuple[str, ...] = ("sum",)
    ks: tuple[int, ...] = DEFAULT_KS
    remove_reference: bool = False
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    describe: str = "catalog"  # reference descriptions in prompts: catalog, predicted (attribute heads) or none
    keep_ranks: bool = False  # add each query's 0-based target rank (for intervals and paired tests)


def default_descriptions(model: CIRModel, images: Path | None) -> Path | None:
    """Where descriptions come from when none are given: the file the model was trained with, else
    the catalog's ``attributes.jsonl`` beside its images folder, else none."""
    candidates = [model.descriptions_source, images.parent / "attributes.jsonl" if images is not None else None]
    return next((Path(c) for c in candidates if c is not None and Path(c).is_file()), None)


def query_texts(model: CIRModel, triplets: list[Triplet], descriptions: dict[str, str] | None = None,
                describe: str = "catalog") -> list[str]:
    """Validation query text: captions joined "C1 and c2"; with the ``prompt`` template, prefixed
    by the reference description: ``catalog``: the triplet's ``reference_prompt`` or
    ``descriptions[candidate]``; ``predicted``: ``descriptions[candidate]`` only (the attribute
    heads' phrases); ``none``: no description."""
    texts = []
    for triplet in triplets:
        caption = join_captions_val(list(triplet.captions))
        if describe == "none":
            prompt = None
        elif describe == "predicted":
            prompt = (descriptions or {}).get(triplet.candidate)
        else:
            prompt = triplet.reference_prompt or (descriptions or {}).get(triplet.candidate)
        texts.append(model.query_text(caption, prompt))
    return texts


def predicted_descriptions(model: CIRModel, features: dict[str, np.ndarray]) -> dict[str, str]:
    """id -> description from the model's attribute heads over raw image features."""
    from ..models.attributes import describe

    ids = list(features)
    if not ids:
        return {}
    predicted = model.predict_attributes(torch.from_numpy(np.stack([features[i] for i in ids])))
    return {i: describe(p) for i, p in zip(ids, predicted)}
def matcher_texts(model: CIRModel, triplets: list[Triplet], descriptions: dict[str, str] | None = None) -> list[str]:
    """The matcher's query text of each triplet (its template decides whether the reference
    description is part of it)."""
    return [model.matcher.query_text(join_captions_val(list(t.captions)),
                                      t.reference_prompt or (descriptions or {}).get(t.candidate)) for t in triplets]


def gallery_vectors(model: CIRModel, image_features: torch.Tensor, ids: list[str], descriptions: dict[str, str] | None,
                    cache: FeatureCache) -> torch.Tensor:
    """Item vectors of a gallery: image features, plus each item's description when the model has a
    matcher (its description features are cached beside the image features)."""
    if model.matcher is None:
        return model.item_vectors(image_features)
    bank = DescriptionBank(cache.root)
    return model.item_vectors(image_features, bank.features(model.matcher, [(descriptions or {}).get(i) for i in ids]))


def score_triplet_set(model: CIRModel, triplet_set: TripletSet, cache: FeatureCache, options: EvalOptions,
                      descriptions: dict[str, str] | None = None) -> dict[str, dict]:
    """Metrics per query mode for one triplet set (keys R@K, n_queries, n_gallery, missing)."""
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
    unusable = len(triplet_set.triplets) - len(triplets)
    prompts = descriptions  # reference descriptions in prompts; gallery items keep the catalog's
    if options.describe == "predicted":
        prompts = predicted_descriptions(model, {t.candidate: ref_lookup[t.candidate] for t in triplets})
    texts = query_texts(model, triplets, prompts, options.describe)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        text_feats = model.backbone.embed_texts(texts, batch_size=256)
        matcher_feats = model.matcher.embed(matcher_texts(model, triplets, None if options.describe == "none" else prompts),
                                            side="query") if model.matcher else None
        image_feats = torch.from_numpy(np.stack([ref_lookup[t.candidate] for t in triplets])) if triplets else torch.zeros(0, gallery.shape[1])
        items = gallery_vectors(model, torch.from_numpy(gallery), gallery_ids, descriptions, cache)
        target_index = np.array([position.get(t.target, -1) for t in triplets], dtype=np.int64)
        reference_index = np.array([position.get(t.candidate, -1) for t in triplets], dtype=np.int64)
        results = {}
        for mode in options.modes:
            device = model.backbone.device  # a Combiner lives with the model, features on the CPU
            queries = model.query_vectors(image_feats.to(device), text_feats.to(device), matcher_feats, mode).float().cpu()
            scores = (queries @ items.T).numpy()
            ranks = target_ranks(scores, target_index, reference_index if options.remove_reference else None)
            results[mode] = {
                **recall_at_k(ranks, options.ks),
                "n_queries": len(triplets),
                "n_gallery": len(gallery_ids),
                "missing": len(triplet_set.missing_images) + failed,
                "skipped_triplets": triplet_set.skipped_triplets + unusable,
            }
            if "R@10" in results[mode] and "R@50" in results[mode]:
                results[mode]["overall"] = (results[mode]["R@10"] + results[mode]["R@50"]) / 2
            if options.keep_ranks:
                results[mode]["ranks"] = [int(r) for r in ranks]
    model.train(was_training)
    return results


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
        if "R@10" in average and "R@50" in average:
            average["overall"] = (average["R@10"] + average["R@50"]) / 2
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
