"""A synthetic FashionIQ-shaped training catalog (random images, annotated + generated triplets)
shared by the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashion_cir.data.triplets import load_triplet_set

COLORS = ["red", "blue", "green", "black", "white", "yellow", "pink", "grey"]


def make_dataset(
    root: Path, n_train: int = 16, n_val: int = 8, n_annotated: int = 12, n_generated: int = 20
) -> dict[str, str]:
    """Random 40x32 images, FashionIQ-format annotated + generated triplets, splits; returns paths."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(n_train + n_val)]
    for image_id in ids:
        Image.fromarray((rng.random((40, 32, 3)) * 255).astype("uint8")).save(images / f"{image_id}.png")
    train, val = ids[:n_train], ids[n_train:]

    def triplets(pool, n, generated):
        r = random.Random(int(generated))
        out = []
        for _ in range(n):
            a, b = r.sample(pool, 2)
            item = {
                "candidate": a,
                "target": b,
                "captions": [f"is {r.choice(COLORS)}", f"has a {r.choice(COLORS)} print"],
            }
            if generated:
                item.update(
                    source="generated", reference_prompt=f"a {r.choice(COLORS)} shirt", hard_negatives=r.sample(pool, 3)
                )
            out.append(item)
        return out

    files = {
        "train": triplets(train, n_annotated, False),
        "generated": triplets(train, n_generated, True),
        "val": triplets(val, 6, False),
        "split_train": train,
        "split_val": val,
    }
    paths = {name: str(root / f"{name}.json") for name in files}
    for name, content in files.items():
        Path(paths[name]).write_text(json.dumps(content))
    paths["images"] = str(images)
    return paths


def load_data(paths: dict[str, str]):
    """(triplets, image paths, val sets, records): records are the catalog's attribute records by
    id (here a description each), as ``read_attributes`` gives them."""
    annotated = load_triplet_set(paths["train"], paths["split_train"], paths["images"])
    generated = load_triplet_set(paths["generated"], paths["split_train"], paths["images"])
    val = load_triplet_set(paths["val"], paths["split_val"], paths["images"], name="val")
    records = {i: {"description": f"a photo of item {i}"} for i in annotated.image_paths}
    return annotated.triplets + generated.triplets, annotated.image_paths, {"val": val}, records


def val_evaluator(val_sets: dict, records: dict | None, cache_dir: Path, selection=None):
    """The evaluator a stage validates with each epoch (as the runner makes it): the val sets, a
    feature cache, the records; ``selection`` None: the mean overall of every set."""
    from fashion_cir.evaluation.evaluate import EvalOptions
    from fashion_cir.evaluation.evaluator import Evaluator
    from fashion_cir.features.cache import FeatureCache

    return Evaluator(val_sets, FeatureCache(cache_dir), records, EvalOptions(progress=False), selection)


def recipe(paths: dict[str, str], out: Path, stage1: dict | None = None, stage2: dict | None = None) -> dict:
    """A recipe for ``fashion-cir run`` on the synthetic catalog: zero-shot, then the given stages."""
    stages = []
    if stage1 is not None:
        stages.append({"name": "stage1", "kind": "stage1", "start": "zero-shot", "config": stage1})
    if stage2 is not None:
        stages.append(
            {
                "name": "stage2",
                "kind": "stage2",
                "start": stages[-1]["name"] if stages else "zero-shot",
                "config": stage2,
            }
        )
    return {
        "name": "synthetic",
        "out": str(out),
        "pictures": False,
        "catalog": {
            "images": paths["images"],
            "splits": {"train": [paths["split_train"]], "val": [paths["split_val"]]},
        },
        "towers": {"backbone": "tiny"},
        "model": {"query_mode": "sum_raw", "text_template": "prompt"},
        "annotated": [{"captions": paths["train"], "split": paths["split_train"]}],
        "generated": [{"captions": paths["generated"], "split": paths["split_train"]}],
        "baselines": [
            {"name": "zero-shot", "variants": [{"label": "zero-shot", "text_template": "prompt", "modes": ["sum_raw"]}]}
        ],
        "stages": stages,
        "evaluation": {"val": [{"captions": paths["val"], "split": paths["split_val"], "name": "val"}]},
    }


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
