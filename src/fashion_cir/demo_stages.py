"""The demo's training, index, picture and serving steps (see :mod:`fashion_cir.demo`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .data.catalog import ClothingCatalog
from .data.triplets import Triplet, TripletSet, load_triplet_set, parse_triplets
from .io import read_json, text_sha1, write_json
from .models.cir import CIRModel


TRAIN_MATCHER_WEIGHT = 0.5  # the fusion weight while training; calibrated on val afterwards


def _stage_configs(fast: bool) -> dict[str, dict]:
    """Demo settings. On CPU the image tower stays frozen (its features are cached) and the text
    tower + projections train; on a GPU the same code trains both towers (``encoders='both'``)."""
    common = {"seed": 0, "progress": False, "checkpoint_every": 200, "log_every": 20, "warmup_ratio": 0.1,
              "select_set": "annotated-val", "select_metric": "overall"}
    stage1 = {**common, "encoders": "text", "epochs": 1, "batch_size": 32 if fast else 64,
              "lr": 3e-5, "scale": 30.0, "hard_negatives_per_query": 1, "annotated_ratio": 0.25}
    stage2 = {**common, "encoders": "text", "epochs": 1, "batch_size": 32 if fast else 128,
              "lr": 2e-5, "temperature": 0.02}
    return {"stage1": stage1, "stage2": stage2}


def _train(demo, name: str, stage: str, settings: dict, model: CIRModel, triplets: list[Triplet],
           image_paths: dict, sets: dict[str, TripletSet], descriptions: dict[str, str]) -> tuple[CIRModel, Path]:
    """Train one stage into ``out/train/<name>`` and publish its best model as ``out/<name>``;
    a finished run with the same config is reused, not retrained."""
    from .training import Stage1Config, Stage2Config, train_stage1, train_stage2

    run_dir = demo.out / "train" / name
    published = demo.out / name
    config_cls, train = (Stage1Config, train_stage1) if stage == "stage1" else (Stage2Config, train_stage2)
    batch = max(2, min(settings["batch_size"], len(triplets) // 2 * 2))  # --fast slices can be smaller than a batch
    config = config_cls.from_dict({**settings, "batch_size": batch, "cache_dir": str(demo.out / "features")}, f"demo {name}")
    wanted = {k: v for k, v in config.model_dump(mode="json").items() if k not in ("progress", "cache_dir")}
    wanted["model"] = {"query_mode": model.query_mode, "text_template": model.text_template,
                       "matcher": {k: v for k, v in model.matcher.config().items() if k != "weight"} if model.matcher else None}
    wanted["triplets"] = text_sha1(*(f"{t.candidate}>{t.target}:{'|'.join(t.captions)}" for t in triplets))
    saved = published / "train_config.json"  # written only once the stage is published
    if (published / "model.json").is_file() and saved.is_file() and read_json(saved) == wanted:
        demo.log(f"reusing trained {name} from {published}")
        return CIRModel.load(published), published
    demo.log(f"training {name}: {len(triplets)} triplets, {config.epochs} epochs, batch {config.batch_size}")
    if model.matcher is not None:
        model.matcher.weight = TRAIN_MATCHER_WEIGHT
    train(config, model, triplets, image_paths, sets["split"], descriptions, run_dir)
    best = run_dir / "best" if (run_dir / "best" / "model.json").is_file() else run_dir / "model"
    trained = CIRModel.load(best)
    if trained.matcher is not None:  # the fusion weight is chosen on val once the stage is trained
        demo.calibrate(trained, sets["split"], descriptions)
    staging = published.with_name(f".{published.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trained.save(staging, {"stage": name})
    write_json(staging / "train_config.json", wanted)
    shutil.rmtree(published, ignore_errors=True)
    staging.replace(published)
    return CIRModel.load(published), published


def run_training_stages(demo, start_from: Path, catalog: ClothingCatalog, generated_train: list[dict],
                        sets: dict[str, dict[str, TripletSet]], descriptions: dict[str, str]) -> dict[str, Path]:
    """Stage 1 on annotated + generated triplets, the annotated-only and generated-only ablations,
    then stage 2 from the stage-1 model. Returns {stage name: published model folder}."""
    settings = _stage_configs(demo.config.fast)
    annotated_set = load_triplet_set(catalog.captions_file("train"), catalog.split_file("train"), catalog.root / "images")
    train_ids = set(catalog.splits["train"])
    annotated = [t for t in annotated_set.triplets if t.candidate in train_ids and t.target in train_ids]
    generated = parse_triplets(generated_train, "generated train triplets")
    image_paths = catalog.split_paths("train")
    published: dict[str, Path] = {}
    runs = [("stage1-annotated-only", annotated), ("stage1-generated-only", generated), ("stage1", annotated + generated)]
    stage1_model = None
    for name, triplets in runs:
        fresh = CIRModel.load(start_from)
        model, published[name] = _train(demo, name, "stage1", settings["stage1"], fresh, triplets, image_paths, sets, descriptions)
        demo.evaluate(name, model, sets, descriptions, (model.query_mode,))
        if name == "stage1":
            stage1_model = model
    model, published["stage2"] = _train(demo, "stage2", "stage2", settings["stage2"], stage1_model,
                                        annotated + generated, image_paths, sets, descriptions)
    demo.evaluate("stage2", model, sets, descriptions, (model.query_mode,))
    return published


def example_picture(model: CIRModel, triplet_set: TripletSet, descriptions: dict[str, str], out: Path,
                    n_queries: int = 4, k: int = 5) -> Path:
    """A PNG: per row the reference, its caption, the top-k results, the target outlined in green."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .data.images import open_image
    from .evaluation.evaluate import gallery_vectors, matcher_texts, query_texts
    from .features.cache import FeatureCache

    cache = FeatureCache(out.parent / "features")
    gallery_ids, gallery = cache.encode(model.backbone, {i: triplet_set.image_paths[i] for i in triplet_set.gallery_ids},
                                        on_error="skip", progress=False)
    position = {i: n for n, i in enumerate(gallery_ids)}
    triplets = [t for t in triplet_set.triplets if t.candidate in position][:: max(1, len(triplet_set.triplets) // n_queries)][:n_queries]
    with torch.no_grad():
        matched = model.matcher.embed(matcher_texts(model, triplets, descriptions), side="query") if model.matcher else None
        queries = model.query_vectors(torch.from_numpy(np.stack([gallery[position[t.candidate]] for t in triplets])),
                                      model.backbone.embed_texts(query_texts(model, triplets, descriptions)), matched)
        scores = queries @ gallery_vectors(model, torch.from_numpy(gallery), gallery_ids, descriptions, cache).T
    fig, axes = plt.subplots(len(triplets), k + 1, figsize=(2.2 * (k + 1), 3.7 * len(triplets)), squeeze=False)
    for row, (triplet, score) in enumerate(zip(triplets, scores)):
        score[position[triplet.candidate]] = -float("inf")  # shown on the left; FashionIQ ranks it too
        top = torch.argsort(score, descending=True, stable=True)[:k].tolist()
        cells = [(triplet.candidate, "reference")] + [(gallery_ids[i], f"#{n + 1}  {score[i]:.2f}") for n, i in enumerate(top)]
        for col, (image_id, label) in enumerate(cells):
            ax = axes[row][col]
            ax.imshow(open_image(triplet_set.image_paths[image_id]).resize((160, 213)))
            ax.set_xticks([]), ax.set_yticks([])
            is_target = col > 0 and image_id == triplet.target
            ax.set_title(label + ("  TARGET" if is_target else ""), fontsize=8, color="green" if is_target else "black")
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if is_target else "#bbbbbb")
                spine.set_linewidth(4 if is_target else 1)
        axes[row][0].set_xlabel(textwrap.fill(" / ".join(triplet.captions), 34), fontsize=8)
    fig.suptitle("Annotated clothing val queries: reference + caption -> top-5, reference itself left out "
                 "(target in green)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def triplet_picture(triplets: list[dict], image_paths: dict[str, Path], out: Path, n: int = 4) -> Path:
    """A PNG of generated triplets: per row the reference, the target, the two captions, the
    attribute changes and the reference prompt."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.images import open_image

    chosen = triplets[:: max(1, len(triplets) // n)][:n]
    fig, axes = plt.subplots(len(chosen), 3, figsize=(10, 2.9 * len(chosen)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 2.6]})
    for row, triplet in enumerate(chosen):
        for col, key in enumerate(("candidate", "target")):
            ax = axes[row][col]
            ax.imshow(open_image(image_paths[triplet[key]]).resize((150, 200)))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("reference" if key == "candidate" else "target", fontsize=9)
        changes = ", ".join(f"{a}: {v[0]} -> {v[1]}" for a, v in triplet.get("changes", {}).items())
        lines = [f"caption 1: {triplet['captions'][0]}", f"caption 2: {triplet['captions'][-1]}",
                 f"changes: {changes}", f"reference prompt: {triplet.get('reference_prompt', '')}"]
        text = "\n".join(textwrap.fill(line, 62, subsequent_indent="    ") for line in lines)
        axes[row][2].axis("off")
        axes[row][2].text(0, 0.5, text, fontsize=9, va="center", family="monospace")
    fig.suptitle("Generated attribute-aware triplets (clothing train split)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def finish_demo(demo, catalog: ClothingCatalog, sets: dict[str, TripletSet], descriptions: dict[str, str]) -> None:
    """Picture of example queries, the searchable index of the catalog, then (optionally) the web page."""
    from .retrieval.index import build_index, search

    best = CIRModel.load(demo.out / "best")
    picture = example_picture(best, sets["annotated-val"], descriptions, demo.out / "examples.png")
    demo.log(f"example queries: {picture}")
    generated = read_json(demo.out / "triplets" / "train.json", "generated triplets")
    demo.log(f"example triplets: {triplet_picture(generated, catalog.image_paths, demo.out / 'triplets.png')}")
    index_dir = demo.out / "index"
    split_names = ("train", "val") if demo.config.fast else ("train", "val", "test")
    catalog_paths = {i: p for s in split_names for i, p in catalog.split_paths(s).items()}
    metadata = {i: {k: v for k, v in catalog.attributes.get(i, {}).items() if k != "image"} | {"label": catalog.labels.get(i)}
                for i in catalog_paths}
    index = build_index(index_dir, best, catalog_paths, metadata, cache_dir=demo.out / "features", overwrite=True, progress=False)
    example = sets["annotated-val"].triplets[0]
    hits = search(best, index, item_id=example.candidate, text=example.captions[0], k=5, exclude_reference=True)
    demo.log(f"index: {len(index)} catalog images in {index_dir}; example search "
             f"'{example.captions[0]}' -> {json.dumps([h.id[:8] for h in hits])}")
    if demo.config.serve:
        from .serving.app import serve

        print(f"\nServing the demo catalog at http://127.0.0.1:{demo.config.port}/  (Ctrl+C to stop)", flush=True)
        serve(index_dir, best, host="127.0.0.1", port=demo.config.port)
