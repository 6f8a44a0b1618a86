"""Tower comparison (issue 9): the demo recipe with another offline tower choice, side by side.

For each ``offline[+OPTION...]`` spec: align the projections on the train split, score the demo's
zero-shot baselines (image / text / sum, prompt on and off, and the fused zero-shot: description
matcher and attributes, fusion weights fitted on the training captions) on the 240 annotated val captions under both protocols, optionally train stage 1
(``--stage1``), and measure how much colour the image side carries (the colour attribute of the val
images from their train-split neighbours: 10-NN vote and a linear probe, on the pooled tower
features and on the aligned image vectors), plus R@10 on the val queries whose target has another
colour than the reference (by the MLLM attributes).
Every choice is made on val; the test split's images are only in the catalog-protocol gallery.

    nice -n 10 .venv/bin/python benchmarks/towers.py offline offline+lite2 offline+hsv [--stage1]
    .venv/bin/python benchmarks/towers.py --table          # the markdown table of every finished run

Each spec runs in ``runs/towers/<spec>`` (its recipe, run.json and results beside it), sharing the
demo's content-keyed feature cache (``runs/demo/features``); figures go to ``runs/towers/<spec>.json``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fashion_cir.evaluation.stats import paired_difference
from fashion_cir.io import read_json, write_json
from fashion_cir.models.cir import CIRModel
from fashion_cir.pipeline.recipe import Recipe
from fashion_cir.pipeline.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "towers"
SHARED_CACHE = ROOT / "runs" / "demo" / "features"
ANNOTATED = "annotated-val"


def tower_recipe(spec: str, stage1: bool, encoders: str) -> Recipe:
    """The demo recipe with ``spec`` as towers; stage 1 only (from the fused zero-shot) when asked."""
    data = json.loads((ROOT / "configs" / "demo_clothing.json").read_text())
    data.update(name=f"towers-{spec}", out=str(OUT / spec), attribute_heads=False, pictures=False, index=None)
    data["towers"]["backbone"] = spec
    data.pop("profiles", None)
    data["generate"] = {"train": data["generate"]["train"]} if stage1 else {}
    data["evaluation"]["generated_val"] = False
    stage = next(s for s in data["stages"] if s["name"] == "stage1")
    stage["config"]["encoders"] = encoders
    data["stages"] = [stage] if stage1 else []
    data["evaluation"]["compare"] = [["zero-shot-fused", "zero-shot"]] + (
        [["stage1", "zero-shot-fused"]] if stage1 else []
    )
    return Recipe.model_validate(data)


def colour_probe(features: dict[str, np.ndarray], colours: dict[str, str], train: list[str], val: list[str]) -> dict:
    """Colour of each val image from train images: majority of its 10 nearest (cosine) neighbours,
    and a linear probe (softmax regression, 200 full-batch steps); accuracies in %, majority class too."""
    train = [i for i in train if i in features and colours.get(i)]
    val = [i for i in val if i in features and colours.get(i)]
    names = sorted({colours[i] for i in train})
    label = {c: k for k, c in enumerate(names)}
    xt = F.normalize(torch.from_numpy(np.stack([features[i] for i in train])).float(), dim=-1)
    xv = F.normalize(torch.from_numpy(np.stack([features[i] for i in val])).float(), dim=-1)
    yt = torch.tensor([label[colours[i]] for i in train])
    yv = torch.tensor([label.get(colours[i], -1) for i in val])
    neighbours = (xv @ xt.T).topk(10, dim=1).indices
    votes = F.one_hot(yt[neighbours], len(names)).sum(1)
    knn = float((votes.argmax(1) == yv).float().mean() * 100)
    torch.manual_seed(0)
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    probe = torch.nn.Linear(xt.shape[1], len(names))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(probe((xt - mean) / std), yt).backward()
        optimizer.step()
    with torch.no_grad():
        linear = float((probe((xv - mean) / std).argmax(1) == yv).float().mean() * 100)
    majority = float((yv == torch.bincount(yt).argmax()).float().mean() * 100)
    return {"knn10": round(knn, 1), "linear": round(linear, 1), "majority": round(majority, 1), "n_val": len(val)}


def run_tower(spec: str, stage1: bool, encoders: str) -> dict:
    recipe = tower_recipe(spec, stage1, encoders)
    runner = Runner(recipe, source="benchmarks/towers.py")
    runner.out.mkdir(parents=True, exist_ok=True)
    features = runner.out / "features"
    if not features.exists():
        SHARED_CACHE.mkdir(parents=True, exist_ok=True)
        features.symlink_to(SHARED_CACHE)
    (runner.out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    runner.labels = {}
    runner.record_run()
    runner.catalog_ = catalog = runner.catalog()
    backbone = runner.towers(catalog)
    lap("features + alignment")
    runner.generated = {s: runner.generated_triplets(CIRModel(backbone), catalog, s) for s in recipe.generate}
    runner.evaluator_ = runner.evaluator()
    published = {b.name: runner.baseline(b, backbone) for b in recipe.baselines}
    lap("zero-shot baselines (both protocols)")
    for stage in recipe.stages:
        published[stage.name] = runner.train_stage(stage, published[stage.start])
        lap(f"{stage.name} (train + fusion refit)")
        runner.score(stage.name, CIRModel.load(published[stage.name]))
        lap(f"{stage.name} (score)")
    runner.finish(published)

    align = read_json(runner.out / "offline-backbone" / "offline_backbone.json", "alignment")["align"]
    result = {
        "spec": spec,
        "stage1": stage1,
        "encoders": encoders if stage1 else None,
        "seconds": seconds,
        "align_val_image_to_text_R@10": round(align["best_val_image_to_text_R@10"], 1),
        "rows": {},
    }
    for row in runner.rows:
        if row["set"] == ANNOTATED and row["stage"] != "random":
            key = f"{row['stage']}/{row['mode']}|{row['protocol']}"
            result["rows"][key] = {"R@10": round(row["R@10"], 2), "R@50": round(row["R@50"], 2)}
    # colour changes: val queries whose target's colour (MLLM attribute) differs from the reference's
    colour_of = {i: a.get("color") for i, a in catalog.attributes.items()}
    triplets = runner.evaluator_.sets[ANNOTATED].triplets
    asks = [colour_of.get(t.candidate) != colour_of.get(t.target) for t in triplets]
    result["colour_queries"] = int(sum(asks))
    for key, ranks in runner.ranks.items():
        if key.endswith(f"|{ANNOTATED}"):
            picked = [r for r, a in zip(ranks, asks) if a]
            name = key.removesuffix(f"|{ANNOTATED}")
            result["rows"].setdefault(name, {})["colour R@10"] = round(
                100 * float(np.mean([r < 10 for r in picked])), 2
            )
    result["ranks"] = {
        k.removesuffix(f"|{ANNOTATED}"): v for k, v in runner.ranks.items() if k.endswith(f"|{ANNOTATED}")
    }
    # the colour the image side carries: pooled tower features and aligned image vectors
    train, val = catalog.splits["train"], catalog.splits["val"]
    paths = {i: catalog.image_paths[i] for i in train + val if i in catalog.image_paths}
    projected = dict(zip(*runner.cache.encode(backbone, paths, on_error="skip", progress=False)))
    backbone.project = False
    pooled = dict(zip(*runner.cache.encode(backbone, paths, on_error="skip", progress=False)))
    backbone.project = True
    result["colour_probe"] = {
        "pooled": colour_probe(pooled, colour_of, train, val),
        "aligned": colour_probe(projected, colour_of, train, val),
    }
    write_json(OUT / f"{spec}.json", result)
    return result


def paired_against(result: dict, baseline: dict, key: str) -> str:
    if key not in result["ranks"] or key not in baseline["ranks"]:
        return "-"
    d, lo, hi = paired_difference(result["ranks"][key], baseline["ranks"][key], 10)
    return f"{d:+.1f} [{lo:+.1f},{hi:+.1f}]"


def table(baseline_spec: str = "offline") -> str:
    """One row per finished spec: alignment, colour probes, and per model R@10 split / catalog
    (colour-change queries, split) with the paired differences against ``baseline_spec``."""
    results = [read_json(p, "tower result") for p in sorted(OUT.glob("offline*.json"))]
    base = next((r for r in results if r["spec"] == baseline_spec), None)
    columns = [
        ("text-only zero-shot (text -> image)", "zero-shot-no-prompt/text"),
        ("fused zero-shot", "zero-shot-fused/sum"),
        ("stage 1", "stage1/sum"),
    ]
    head = ["towers", "align i2t R@10", "colour kNN / probe: pooled", "colour kNN / probe: aligned"]
    for title, _ in columns:
        head += [f"{title}: split / catalog R@10 (colour changes, split)", "split / catalog vs offline (paired R@10)"]
    head += ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        probe = r["colour_probe"]
        cells = [
            r["spec"],
            f"{r['align_val_image_to_text_R@10']:.1f}",
            f"{probe['pooled']['knn10']:.1f} / {probe['pooled']['linear']:.1f}",
            f"{probe['aligned']['knn10']:.1f} / {probe['aligned']['linear']:.1f}",
        ]
        for _, key in columns:
            split, catalog = r["rows"].get(f"{key}|split"), r["rows"].get(f"{key}|catalog")
            cells.append(
                f"{split['R@10']:.1f} / {catalog['R@10']:.1f} ({split['colour R@10']:.1f})"
                if split and catalog
                else "-"
            )
            cells.append(
                " / ".join(paired_against(r, base, f"{key}|{protocol}") for protocol in ("split", "catalog"))
                if base and r is not base
                else "-"
            )
        cells.append(", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    n = results[0]["colour_queries"] if results else 0
    return (
        "\n".join(lines)
        + f"\n\n(colour changes: the {n} of the 240 val queries whose target has another colour than the reference)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", help="offline[+OPTION...] tower specs")
    parser.add_argument("--stage1", action="store_true", help="also train stage 1 (the demo's settings)")
    parser.add_argument(
        "--encoders", default="text", help="stage 1 encoders (both: text + the image head with blocksN)"
    )
    parser.add_argument("--table", action="store_true", help="print the table of every finished run")
    args = parser.parse_args()
    for spec in args.specs:
        started = time.perf_counter()
        result = run_tower(spec, args.stage1, args.encoders)
        print(
            f"{spec}: {json.dumps({k: v for k, v in result.items() if k not in ('ranks', 'rows')})} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if args.table or not args.specs:
        print(table())


if __name__ == "__main__":
    main()
