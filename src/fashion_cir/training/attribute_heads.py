"""Training a model folder's attribute heads on a catalog: image features of the train and val
splits (through the feature cache), labels from the MLLM attributes, heads saved into the folder."""

from __future__ import annotations

from typing import Any

from ..data.catalog import ClothingCatalog
from ..errors import DataError
from ..features.cache import FeatureCache
from ..models.attributes import AttributeHeads, HeadsConfig, train_heads
from ..models.cir import CIRModel


def fit_attribute_heads(
    model: CIRModel,
    catalog: ClothingCatalog,
    cache: FeatureCache,
    config: HeadsConfig | None = None,
    progress: bool = False,
    max_train_images: int | None = None,
) -> AttributeHeads:
    """Heads trained on ``catalog``'s train split (its first ``max_train_images`` images when
    given) and selected on its val split (never test), attached to ``model``."""
    features = {}
    for split in ("train", "val"):
        paths = {i: p for i, p in catalog.split_paths(split).items() if i in catalog.attributes}
        if split == "train" and max_train_images is not None:
            paths = dict(list(paths.items())[:max_train_images])
        if not paths:
            raise DataError(f"catalog {catalog.root}: no {split} image has MLLM attributes to learn from")
        ids, feats = cache.encode(model.backbone, paths, on_error="skip", progress=progress)
        features[split] = (ids, feats)
    (train_ids, train_x), (val_ids, val_x) = features["train"], features["val"]
    heads = train_heads(
        train_x,
        [catalog.attributes[i] for i in train_ids],
        val_x,
        [catalog.attributes[i] for i in val_ids],
        config=config,
    )
    heads.info["trained_on"] = {
        "catalog": catalog.root.name,
        "train_images": len(train_ids),
        "val_images": len(val_ids),
    }
    model.attach_heads(heads)
    return heads


def format_report(heads: AttributeHeads) -> str:
    """A markdown table: per attribute, val accuracy and macro-F1 of the heads and of the majority class."""
    lines = [
        "| attribute | accuracy | macro-F1 | majority accuracy | majority macro-F1 | majority value | val images |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: dict[str, Any] = heads.info.get("val", {})
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.1f} | {r['macro_f1']:.1f} | {r['majority_accuracy']:.1f} | "
            f"{r['majority_macro_f1']:.1f} | {r['majority']} | {r['n_val']} |"
        )
    if rows:
        mean = {
            k: sum(r[k] for r in rows.values()) / len(rows)
            for k in ("accuracy", "macro_f1", "majority_accuracy", "majority_macro_f1")
        }
        lines.append(
            f"| mean | {mean['accuracy']:.1f} | {mean['macro_f1']:.1f} | {mean['majority_accuracy']:.1f} | "
            f"{mean['majority_macro_f1']:.1f} | | |"
        )
    return "\n".join(lines)
