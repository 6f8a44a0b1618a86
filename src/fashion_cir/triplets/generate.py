"""``generate_triplets``: attributes + static features -> FashionIQ-format training triplets with
relative captions, a sentence-level reference prompt, attribute changes and hard negatives."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..captioning.schema import Attributes
from ..data.triplets import parse_triplets
from ..errors import DataError
from ..io import environment_info, write_json
from .config import TripletConfig
from .mining import mine_pairs
from .negatives import hard_negatives
from .phrasing import change_only_captions, relative_captions
from .rewrite import TextGenerator, rewrite_captions
from .table import AttributeTable

SOURCE = "mllm-attributes+templates"


def _pool(
    attributes: dict[str, Attributes], features: np.ndarray, ids: list[str], train_ids: Iterable[str] | None
) -> tuple[list[int], dict]:
    """Rows of ``features`` usable for mining (in the training ids, captioned), and what was skipped."""
    if features.ndim != 2 or len(features) != len(ids):
        raise DataError(
            f"features must be an [N, d] array aligned with ids; got shape {features.shape} for {len(ids)} ids"
        )
    if len(set(ids)) != len(ids):
        raise DataError("ids contain duplicates")
    train = set(train_ids) if train_ids is not None else None
    rows: list[int] = []
    skipped: Counter[str] = Counter()
    for row, image_id in enumerate(ids):
        if train is not None and image_id not in train:
            skipped["not_in_train"] += 1
        elif image_id not in attributes:
            skipped["not_captioned"] += 1
        elif not np.isfinite(features[row]).all() or not np.any(features[row]):
            skipped["bad_features"] += 1
        else:
            rows.append(row)
    if train is not None:
        skipped["train_without_features"] = len(train - set(ids))
    return rows, dict(skipped)


def generate_triplets(
    attributes: dict[str, Attributes],
    features: np.ndarray,
    ids: list[str],
    config: TripletConfig,
    train_ids: Iterable[str] | None = None,
    rewriter: TextGenerator | None = None,
) -> tuple[list[dict], dict]:
    """Mine pairs among ``ids`` (restricted to ``train_ids`` when given: never pass val/test images as
    a pool) and return (triplets, stats). Each triplet: ``candidate``, ``target``, ``captions`` (two),
    ``reference_prompt``/``target_prompt`` (the descriptions), ``changes`` ({attribute: [from, to]}),
    ``hard_negatives`` (ids), ``source``. Images without attributes are skipped and counted."""
    started = time.perf_counter()
    rows, skipped = _pool(attributes, np.asarray(features), ids, train_ids)
    if len(rows) < 2:
        raise DataError(
            f"only {len(rows)} usable images (captioned, in the training ids, with features); skipped: {skipped}"
        )
    pool_ids = [ids[r] for r in rows]
    pool = np.asarray(features, dtype=np.float32)[rows]
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    records = [attributes[i] for i in pool_ids]
    table = AttributeTable.build(records, config.compared_attributes, config.vocabulary)
    pairs, mining_stats = mine_pairs(pool, table, config)
    rng = random.Random(config.seed)
    style_rng = random.Random(f"{config.seed}/style")  # its own stream: a share of 0 changes nothing
    triplets: list[dict[str, Any]] = []
    for pair in pairs:
        reference, target = records[pair.reference], records[pair.target]
        changes = {name: [reference[name], target[name]] for name in pair.changed}
        negatives = hard_negatives(pair, pool, table, config.hard_negatives)
        change_only = config.change_only_share > 0 and style_rng.random() < config.change_only_share
        phrase = change_only_captions if change_only else relative_captions
        triplets.append(
            {
                "candidate": pool_ids[pair.reference],
                "target": pool_ids[pair.target],
                "captions": phrase(reference, target, {k: (old, new) for k, (old, new) in changes.items()}, rng),
                "reference_prompt": reference.description,
                "target_prompt": target.description,
                "changes": changes,
                "hard_negatives": [pool_ids[n] for n in negatives],
                "source": SOURCE + ("/change-only" if change_only else ""),
            }
        )
    rewritten = rewrite_captions(triplets, rewriter) if rewriter is not None and triplets else 0
    negatives_count = np.array([len(t["hard_negatives"]) for t in triplets]) if triplets else np.zeros(1)
    stats = {
        "triplets": len(triplets),
        "pool_images": len(rows),
        "skipped": skipped,
        **mining_stats,
        "changes_histogram": dict(Counter(n for t in triplets for n in t["changes"]).most_common()),
        "changes_per_triplet": dict(sorted(Counter(len(t["changes"]) for t in triplets).items())),
        "category_changes": dict(
            Counter("->".join(t["changes"]["category"]) for t in triplets if "category" in t["changes"]).most_common()
        ),
        "hard_negatives_per_triplet": {
            "mean": round(float(negatives_count.mean()), 3),
            "min": int(negatives_count.min()),
            "max": int(negatives_count.max()),
            "zero": int((negatives_count == 0).sum()),
        },
        "distinct_captions": len({c for t in triplets for c in t["captions"]}),
        "change_only": sum("/change-only" in t["source"] for t in triplets),
        "rewritten": rewritten,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return triplets, stats


def write_triplets(path: str | Path, triplets: list[dict], stats: dict, config: TripletConfig) -> dict[str, Path]:
    """Write ``path`` (FashionIQ JSON list), ``<stem>.stats.json`` and ``<stem>.config.json`` atomically,
    after checking the triplets read back with ``parse_triplets``. Returns the three paths."""
    path = Path(path)
    parse_triplets(triplets, str(path))
    paths = {"triplets": path, "stats": path.with_suffix(".stats.json"), "config": path.with_suffix(".config.json")}
    write_json(paths["triplets"], triplets)
    write_json(paths["stats"], stats)
    write_json(paths["config"], {"config": config.model_dump(mode="json"), "environment": environment_info()})
    return paths
