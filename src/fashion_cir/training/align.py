"""Aligning the offline backbone's projections CLIP-style (LiT: towers frozen, features cached).

Pairs are (catalog image, its MLLM description) and (image, a short attribute phrase) from the
**train** split; the symmetric InfoNCE loss has a learnable temperature; the val split picks the
best epoch (image->text R@10)."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.catalog import ClothingCatalog
from ..errors import DataError
from ..evaluation.metrics import recall_at_k, target_ranks
from ..features.cache import FeatureCache
from ..io import atomic_write_bytes, environment_info, read_json, text_sha1, write_json
from ..models.offline_backbone import OfflineBackbone, Towers, save_projections
from .losses import SymmetricInfoNCELoss

ATTRIBUTE_ORDER = ("color", "pattern", "sleeves", "material", "category")


class AlignConfig(Config):
    """Projection width, epochs and optimiser of the alignment; train/val image caps for smoke runs."""

    dim: int = 256
    epochs: int = 15
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    max_train_images: int | None = None
    max_val_images: int | None = None


def attribute_phrase(record: dict) -> str:
    """A short noun phrase from attributes: "red solid long-sleeve knit sweater"."""
    words = []
    for key in ATTRIBUTE_ORDER:
        value = record.get(key)
        if not value or value in ("none", "unknown", "other", "solid"):
            continue
        words.append(f"{value}-sleeve" if key == "sleeves" and value != "sleeveless" else str(value))
    return " ".join(words)


def _text_tower_features(backbone: OfflineBackbone, texts: list[str], cache_dir: Path) -> np.ndarray:
    """Frozen text-tower features, cached in one file keyed by the texts and the tower."""
    key = text_sha1(f"{backbone.towers.text}-mean-pool", *texts)
    path = cache_dir / f"text-{key[:16]}.npy"
    if path.is_file():
        return np.load(path)
    features = backbone.embed_texts(texts, batch_size=128).numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write_bytes(path, buffer.getvalue())
    return features


def image_to_text_recall(image: torch.Tensor, text: torch.Tensor, k: int = 10) -> float:
    """R@k of finding each image's own text (row i of ``text``) among all texts."""
    scores = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).numpy()
    return recall_at_k(target_ranks(scores, np.arange(len(scores))), (k,))[f"R@{k}"]


def catalog_key(catalog: ClothingCatalog) -> str:
    """What an alignment learns from: the train and val ids with their descriptions."""
    return text_sha1(
        *(
            f"{i}:{catalog.attributes.get(i, {}).get('description', '')}"
            for split in ("train", "val")
            for i in catalog.splits.get(split, [])
        )
    )


def align_offline_backbone(
    catalog: ClothingCatalog,
    out_dir: str | Path,
    cache: FeatureCache,
    config: AlignConfig = AlignConfig(),
    progress: bool = True,
    towers_spec: str = "offline",
) -> tuple[OfflineBackbone, dict]:
    """Train the projections of the ``towers_spec`` backbone (``offline[+OPTION...]``), save them to
    ``out_dir`` (loadable as ``offline:out_dir``) and return the aligned backbone with a summary. A
    finished alignment of the same towers and catalog with the same config in ``out_dir`` is loaded
    instead (summary ``reused: true``)."""
    out_dir = Path(out_dir)
    choice = Towers.parse(towers_spec)
    saved = out_dir / "offline_backbone.json"
    if saved.is_file():
        recorded = read_json(saved, "aligned offline backbone")
        previous = recorded.get("align", {})
        if (
            previous.get("config") == config.model_dump(mode="json")
            and previous.get("catalog") == catalog_key(catalog)
            and recorded.get("towers", "offline") == choice.spec
        ):
            from ..models.factory import create_backbone

            aligned = cast(OfflineBackbone, create_backbone(f"offline:{out_dir}"))  # an offline: spec builds one
            return aligned, {**previous, "reused": True}
    started = time.perf_counter()
    towers = OfflineBackbone(dim=config.dim, seed=config.seed, project=False, towers=choice).eval()
    splits = {}
    for split in ("train", "val"):
        paths = {
            i: p for i, p in catalog.split_paths(split).items() if catalog.attributes.get(i, {}).get("description")
        }
        limit = config.max_train_images if split == "train" else config.max_val_images
        if limit:
            paths = dict(list(paths.items())[:limit])
        ids, image_feats = cache.encode(towers, paths, batch_size=32, on_error="skip", progress=progress)
        if len(ids) < 2:
            raise DataError(
                f"alignment needs at least 2 described, readable images in the {split} split of "
                f"{catalog.root}; found {len(ids)}"
            )
        descriptions = [catalog.attributes[i]["description"] for i in ids]
        phrases = [attribute_phrase(catalog.attributes[i]) or catalog.attributes[i]["description"] for i in ids]
        text_feats = _text_tower_features(towers, descriptions + phrases, cache.root)
        splits[split] = (
            torch.from_numpy(image_feats),
            torch.from_numpy(text_feats[: len(ids)]),
            torch.from_numpy(text_feats[len(ids) :]),
        )

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    image_proj = towers.image_proj.train()
    text_proj = towers.text_proj.train()
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = list(image_proj.parameters()) + list(text_proj.parameters()) + [logit_scale]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    clip_loss = SymmetricInfoNCELoss()
    train_img, train_desc, train_phrase = splits["train"]
    val_img, val_desc, _ = splits["val"]
    history: list[dict] = []
    best: tuple[float, dict, int] = (-1.0, {}, 0)
    n = len(train_img)
    for epoch in range(config.epochs):
        order = list(range(n))
        rng.shuffle(order)
        losses = []
        for start in range(0, n, config.batch_size):
            batch = torch.tensor(order[start : start + config.batch_size])
            if len(batch) < 2:
                continue
            use_phrase = torch.rand(len(batch)) < 0.3
            text = torch.where(use_phrase.unsqueeze(1), train_phrase[batch], train_desc[batch])
            loss = clip_loss(image_proj(train_img[batch]), text_proj(text), logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            val_r10 = image_to_text_recall(image_proj(val_img), text_proj(val_desc))
            towers.logit_scale.copy_(logit_scale)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "val_image_to_text_R@10": val_r10,
                "temperature": float(1 / logit_scale.detach().exp()),
            }
        )
        if val_r10 > best[0]:
            best = (val_r10, {k: v.clone() for k, v in towers.projection_state().items()}, epoch + 1)
    towers.load_state_dict(best[1], strict=False)
    towers.project = True
    summary = {
        "config": config.model_dump(mode="json"),
        "catalog": catalog_key(catalog),
        "train_pairs": n,
        "val_pairs": len(val_img),
        "best_epoch": best[2],
        "best_val_image_to_text_R@10": best[0],
        "first_epoch_loss": history[0]["train_loss"] if history else None,
        "last_epoch_loss": history[-1]["train_loss"] if history else None,
        "seconds": time.perf_counter() - started,
        "versions": environment_info(),
    }
    save_projections(towers, out_dir, {"align": summary})
    write_json(out_dir / "history.json", history)
    towers.spec = f"{choice.spec}:{out_dir.resolve()}"
    return towers.eval(), summary
