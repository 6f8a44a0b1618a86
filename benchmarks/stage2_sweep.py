"""Stage-2 settings sweep (issue 9): does stage 2 measurably improve on the demo's stage-1 model?

Starts from the demo's published ``stage1`` model, trains stage 2 with the given settings exactly as
the demo does (matcher weight 0.5 while training, best epoch on annotated val), chooses the matcher
weight on annotated val (``Demo.calibrate``), then scores the annotated val captions under both
protocols (split: the val split's 563 images; catalog: all 5,756 images, reference removed) and
prints the paired bootstrap difference against stage 1 on the same queries.

    nice -n 15 .venv/bin/python benchmarks/stage2_sweep.py --name e3 --epochs 3
    nice -n 15 .venv/bin/python benchmarks/stage2_sweep.py --name demo-stage2 --model runs/demo/stage2   # score only

Needs a finished demo in ``--demo`` (``fashion-cir demo``: its stage1 folder, feature cache and
generated train triplets). Every choice is made on the clothing val split; the test split's images
appear only in the catalog-protocol gallery. Results: ``<out>/<name>/result.json``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fashion_cir.data.catalog import load_clothing_catalog
from fashion_cir.data.triplets import load_triplet_set, parse_triplets
from fashion_cir.demo import ANNOTATED, GENERATED, Demo, DemoConfig
from fashion_cir.demo_stages import TRAIN_MATCHER_WEIGHT, _stage_configs
from fashion_cir.evaluation.stats import paired_difference
from fashion_cir.io import read_json, write_json
from fashion_cir.models.cir import CIRModel

PROTOCOLS = ("split", "catalog")


def annotated_sets(demo: Demo, catalog) -> dict[str, dict]:
    """{protocol: {annotated-val: TripletSet}} as the demo builds them."""
    split = load_triplet_set(catalog.captions_file("val"), catalog.split_file("val"), catalog.root / "images", name=ANNOTATED)
    return {"split": {ANNOTATED: split}, "catalog": demo.catalog_sets(catalog, {ANNOTATED: split})}


def score(demo: Demo, name: str, model: CIRModel, sets: dict, descriptions: dict) -> dict:
    """Calibrate the matcher weight on annotated val (split protocol), then per-query ranks per protocol."""
    weight = demo.calibrate(model, sets["split"], descriptions)
    reports = demo.evaluate(name, model, sets, descriptions, (model.query_mode,))
    out = {"weight": weight}
    for protocol in PROTOCOLS:
        metrics = reports[protocol][model.query_mode][ANNOTATED]
        out[protocol] = {"R@10": metrics["R@10"], "R@50": metrics["R@50"], "ranks": metrics["ranks"]}
    return out


def generated_catalog_ranks(demo: Demo, name: str, model: CIRModel, catalog, descriptions: dict) -> list[int]:
    """Per-query ranks of the generated val triplets (queries never used for any choice here),
    catalog protocol, at the model's current matcher weight."""
    split = demo.val_sets(catalog, read_json(demo.out / "triplets" / "val.json", "generated val triplets"))
    sets = {"catalog": demo.catalog_sets(catalog, {GENERATED: split[GENERATED]})}
    return demo.evaluate(name, model, sets, descriptions, (model.query_mode,))["catalog"][model.query_mode][GENERATED]["ranks"]


def train(args, demo: Demo, catalog, sets: dict, descriptions: dict, run_dir: Path) -> CIRModel:
    from fashion_cir.training import Stage2Config, train_stage2

    settings = {**_stage_configs(False)["stage2"], "epochs": args.epochs, "lr": args.lr, "temperature": args.temperature,
                "batch_size": args.batch_size, "encoders": args.encoders, "annotated_ratio": args.annotated_ratio,
                "hard_negatives_per_query": args.hard_negatives, "hard_negative_weight": args.hard_weight,
                "seed": args.seed, "cache_dir": str(demo.out / "features")}
    config = Stage2Config.from_dict(settings, f"sweep {args.name}")
    annotated_set = load_triplet_set(catalog.captions_file("train"), catalog.split_file("train"), catalog.root / "images")
    train_ids = set(catalog.splits["train"])
    annotated = [t for t in annotated_set.triplets if t.candidate in train_ids and t.target in train_ids]
    generated = parse_triplets(read_json(demo.out / "triplets" / "train.json", "generated triplets"), "generated train triplets")
    model = CIRModel.load(demo.out / "stage1")
    model.matcher.weight = TRAIN_MATCHER_WEIGHT
    print(f"training {args.name}: {config.model_dump(exclude={'progress', 'cache_dir'})}", flush=True)
    train_stage2(config, model, annotated + generated, catalog.split_paths("train"), sets["split"], descriptions, run_dir)
    best = run_dir / "best" if (run_dir / "best" / "model.json").is_file() else run_dir / "model"
    return CIRModel.load(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="this setting's folder under --out")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="finished demo folder (stage1, features, triplets)")
    parser.add_argument("--out", type=Path, default=Path("runs/stage2-sweep"))
    parser.add_argument("--model", type=Path, help="score this model folder instead of training one")
    parser.add_argument("--text-from", type=Path,
                        help="with --model: use this model folder's backbone (text tower) instead, keeping --model's matcher")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encoders", choices=("text", "none"), default="text",
                        help="text: text tower + matcher query encoder; none: the matcher query encoder only")
    parser.add_argument("--annotated-ratio", type=float, default=None, help="share of annotated triplets per batch")
    parser.add_argument("--hard-negatives", type=int, default=0, help="each triplet's hard negatives weighted in")
    parser.add_argument("--hard-weight", type=float, default=1.0, help="how many times a hard negative counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confirm", action="store_true",
                        help="also score the generated val triplets (catalog protocol) against stage 1: held-out queries")
    args = parser.parse_args()

    started = time.perf_counter()
    demo = Demo(DemoConfig(out=args.demo, serve=False))
    catalog = load_clothing_catalog()
    descriptions = catalog.descriptions()
    sets = annotated_sets(demo, catalog)

    baseline_file = args.out / "stage1.json"
    if baseline_file.is_file():
        baseline = read_json(baseline_file)
    else:
        baseline = score(demo, "stage1", CIRModel.load(args.demo / "stage1"), sets, descriptions)
        write_json(baseline_file, baseline)
    model = CIRModel.load(args.model) if args.model else train(args, demo, catalog, sets, descriptions, args.out / args.name / "train")
    if args.text_from:  # attribution: which trained part carries a stage's gain
        model.backbone.load_state_dict(CIRModel.load(args.text_from).backbone.state_dict())
    result = score(demo, args.name, model, sets, descriptions)
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    lines = [f"{args.name}: matcher weight {result['weight']} (stage1 {baseline['weight']}), {result['seconds']:.0f}s"]
    for protocol in PROTOCOLS:
        diffs = {k: paired_difference(result[protocol]["ranks"], baseline[protocol]["ranks"], k) for k in (10, 50)}
        result[protocol]["vs_stage1"] = {f"R@{k}": list(d) for k, d in diffs.items()}
        lines.append(f"  {protocol:8s} R@10 {result[protocol]['R@10']:5.1f} (stage1 {baseline[protocol]['R@10']:5.1f}) "
                     f"R@50 {result[protocol]['R@50']:5.1f} (stage1 {baseline[protocol]['R@50']:5.1f}) | paired "
                     + "  ".join(f"R@{k} {d:+.1f} [{lo:+.1f},{hi:+.1f}]" for k, (d, lo, hi) in diffs.items()))
    if args.confirm:
        confirm_file = args.out / "stage1-generated.json"
        if not confirm_file.is_file():
            write_json(confirm_file, generated_catalog_ranks(demo, "stage1", CIRModel.load(args.demo / "stage1"), catalog, descriptions))
        before, after = read_json(confirm_file), generated_catalog_ranks(demo, args.name, model, catalog, descriptions)
        diffs = {k: paired_difference(after, before, k) for k in (10, 50)}
        result["generated_catalog"] = {"ranks": after, "vs_stage1": {f"R@{k}": list(d) for k, d in diffs.items()}}
        lines.append("  generated val, catalog: paired " + "  ".join(f"R@{k} {d:+.1f} [{lo:+.1f},{hi:+.1f}]"
                                                                   for k, (d, lo, hi) in diffs.items()))
    write_json(args.out / args.name / "result.json", result)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
