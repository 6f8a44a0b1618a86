"""The run's pictures: example queries with their top results, generated triplets, and the
training curves (loss and val R@10 / R@50 per epoch, per stage)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import open_image
from ..data.triplets import TripletSet
from ..evaluation.evaluate import EvalOptions, PreparedSet
from ..features.cache import FeatureCache
from ..models.cir import CIRModel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def example_picture(
    model: CIRModel,
    triplet_set: TripletSet,
    records: Mapping[str, Mapping[str, Any]],
    cache: FeatureCache,
    out: Path,
    n_queries: int = 4,
    k: int = 5,
) -> Path:
    """A PNG: per row the reference, its caption, the top-k results (reference left out), the
    target outlined in green."""
    plt = _pyplot()
    chosen = triplet_set.triplets[:: max(1, len(triplet_set.triplets) // n_queries)][:n_queries]
    prepared = PreparedSet(
        model, dataclasses.replace(triplet_set, triplets=chosen), cache, EvalOptions(progress=False), records
    )
    triplets = prepared.triplets
    scores = prepared.scores("split")
    gallery_ids = [prepared.ids[c] for c in prepared.columns["split"]]
    results = []
    for triplet, row in zip(triplets, scores):
        order = [c for c in np.argsort(-row, kind="stable") if gallery_ids[c] != triplet.candidate][:k]
        results.append([(gallery_ids[c], float(row[c])) for c in order])
    fig, axes = plt.subplots(len(triplets), k + 1, figsize=(2.2 * (k + 1), 3.7 * len(triplets)), squeeze=False)
    for row, (triplet, hits) in enumerate(zip(triplets, results)):
        cells = [(triplet.candidate, "reference")] + [
            (image_id, f"#{n + 1}  {score:.2f}") for n, (image_id, score) in enumerate(hits)
        ]
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
    fig.suptitle(
        f"{triplet_set.name} queries: reference + caption -> top-{k}, reference left out (target in green)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def triplet_picture(triplets: list[dict], image_paths: dict[str, Path], out: Path, n: int = 4) -> Path:
    """A PNG of generated triplets: per row the reference, the target, the two captions, the
    attribute changes and the reference prompt."""
    plt = _pyplot()
    chosen = triplets[:: max(1, len(triplets) // n)][:n]
    fig, axes = plt.subplots(
        len(chosen), 3, figsize=(10, 2.9 * len(chosen)), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 2.6]}
    )
    for row, triplet in enumerate(chosen):
        for col, key in enumerate(("candidate", "target")):
            ax = axes[row][col]
            ax.imshow(open_image(image_paths[triplet[key]]).resize((150, 200)))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("reference" if key == "candidate" else "target", fontsize=9)
        changes = ", ".join(f"{a}: {v[0]} -> {v[1]}" for a, v in triplet.get("changes", {}).items())
        lines = [
            f"caption 1: {triplet['captions'][0]}",
            f"caption 2: {triplet['captions'][-1]}",
            f"changes: {changes}",
            f"reference prompt: {triplet.get('reference_prompt', '')}",
        ]
        text = "\n".join(textwrap.fill(line, 62, subsequent_indent="    ") for line in lines)
        axes[row][2].axis("off")
        axes[row][2].text(0, 0.5, text, fontsize=9, va="center", family="monospace")
    fig.suptitle("Generated attribute-aware triplets (clothing train split)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def read_curve(metrics_file: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """(step, loss) records and (step, val R@10, val R@50) per epoch from a stage's metrics.jsonl."""
    losses, val = [], []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses.append((record["step"], record["loss"]))
        if "val" in record:  # {protocol: {set: metrics, "average": ...}}: the first protocol's average
            average = next(iter(record["val"].values()))["average"]
            val.append((record["step"], average["R@10"], average["R@50"]))
    return losses, val


def stage_curves(metrics_files: list[Path], out: Path) -> Path:
    """One column per stage: training loss over steps (top) and val R@10 / R@50 before training and
    after each epoch (bottom)."""
    plt = _pyplot()
    files = [f for f in metrics_files if f.is_file()]
    fig, axes = plt.subplots(2, len(files), figsize=(3.6 * len(files), 5.2), squeeze=False)
    for col, metrics_file in enumerate(files):
        losses, val = read_curve(metrics_file)
        top, bottom = axes[0][col], axes[1][col]
        if losses:
            top.plot(*zip(*losses), color="#444444", linewidth=1, marker=".")
        top.set_title(metrics_file.parent.name, fontsize=9)
        top.set_xlabel("step", fontsize=8), top.set_ylabel("loss", fontsize=8)
        if val:
            steps, r10, r50 = zip(*val)
            bottom.plot(steps, r10, "o-", label="val R@10")
            bottom.plot(steps, r50, "s-", label="val R@50")
            bottom.legend(fontsize=7)
        bottom.set_xlabel("step (before training, then each epoch)", fontsize=8)
        bottom.set_ylabel("val recall % (mean over sets)", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
