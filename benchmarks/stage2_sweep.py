"""Stage-2 settings sweep (issue 9): does stage 2 measurably improve on the demo's stage-1 model?

Trains the demo recipe's stage 2 with some of its settings changed, from the recipe's published
``stage1`` model, exactly as ``fashion-cir run`` does (the runner's ``train_stage``: the start model's
fusion weights while training; a stage that says ``refit_fusion`` keeps its last epoch and has its
fusion weights fitted again on the annotated training captions),
then scores every val set of the recipe under each of its protocols (split: the val split's 563
images; catalog: all 5,756 images, reference removed) and prints the paired bootstrap difference
against stage 1 (or ``--against``, another published model of the run) on the same queries.

    nice -n 15 .venv/bin/python benchmarks/stage2_sweep.py --name t01 --set encoders=none --set temperature=0.01
    nice -n 15 .venv/bin/python benchmarks/stage2_sweep.py --name demo-stage2 --model runs/demo/stage2   # score only

Needs a finished run of the recipe (default configs/demo_clothing.json in runs/demo: its stage1
folder, feature cache and generated triplets). The trained model is published as
``<out>/sweep-<name>`` and the figures written to ``<out>/sweep-<name>.json``. Every choice is made
on the clothing val split; the test split's images appear only in the catalog-protocol gallery.
``--confirm`` also scores the generated val triplets (catalog protocol), queries that no setting
was chosen on."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fashion_cir.data.triplets import TripletSet, parse_triplets
from fashion_cir.evaluation.evaluate import EvalOptions, catalog_protocol
from fashion_cir.evaluation.evaluator import Evaluator
from fashion_cir.evaluation.stats import paired_difference
from fashion_cir.io import read_json, write_json
from fashion_cir.models.cir import CIRModel
from fashion_cir.pipeline.recipe import StageSpec, load_recipe
from fashion_cir.pipeline.runner import GENERATED_VAL, KS, Runner


def setting(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` (VALUE as JSON, else a string) for one Stage2Config field."""
    key, _, raw = text.partition("=")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def paired(after: list[int], before: list[int]) -> dict[str, list[float]]:
    return {f"R@{k}": list(paired_difference(after, before, k)) for k in (10, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="this setting's name (model folder <out>/sweep-NAME)")
    parser.add_argument("--recipe", default="configs/demo_clothing.json")
    parser.add_argument("--out", type=Path, help="the recipe's run folder (default: the recipe's out)")
    parser.add_argument("--against", default="stage1", help="the run's published model every figure is paired with")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=setting,
        default=[],
        metavar="FIELD=VALUE",
        help="a Stage2Config field changed from the recipe's stage 2 (repeatable), e.g. epochs=3",
    )
    parser.add_argument(
        "--model", type=Path, help="score this model folder (its fusion fitted again) instead of training one"
    )
    parser.add_argument("--as-is", action="store_true", help="with --model: keep its own fusion (no refit)")
    parser.add_argument(
        "--text-from",
        type=Path,
        help="with --model: use this model folder's backbone (text tower), keeping --model's matcher",
    )
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="also score the generated val triplets (catalog protocol) against stage 1",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides=[f"out={args.out}"] if args.out else ())
    runner = Runner(recipe, source=args.recipe)
    runner.labels = {}
    runner.catalog_ = runner.catalog()
    runner.generated = {"train": read_json(runner.out / "triplets" / "train.json", "generated train triplets")}
    runner.evaluator_ = runner.evaluator()  # the recipe's val sets and protocols (no generated val: not loaded)
    stage1 = CIRModel.load(runner.out / args.against)  # published: its fusion already fitted
    if args.model:
        model = CIRModel.load(args.model)
        if args.text_from:  # attribution: which trained part carries a stage's gain
            model.backbone.load_state_dict(CIRModel.load(args.text_from).backbone.state_dict())
        if not args.as_is:
            runner.fit_fusion(model)
    else:
        base = next(s for s in recipe.stages if s.kind == "stage2")
        stage = StageSpec(
            name=f"sweep-{args.name}",
            kind="stage2",
            start=base.start,
            data=base.data,
            refit_fusion=base.refit_fusion,
            config={**base.config, **dict(args.settings)},
        )
        runner.log(f"training {stage.name}: {stage.train_config().model_dump(exclude={'progress', 'cache_dir'})}")
        model = CIRModel.load(runner.train_stage(stage, runner.out / base.start))

    before, after = runner.score(args.against, stage1), runner.score(args.name, model)
    result = {
        "settings": dict(args.settings),
        "model": str(args.model or runner.out / f"sweep-{args.name}"),
        "against": args.against,
        "fusion": model.fusion.model_dump(mode="json"),
        "against_fusion": stage1.fusion.model_dump(mode="json"),
    }
    weights = lambda m: {t: w for t, w in m.fusion.weights().items() if w}  # noqa: E731
    lines = [f"{args.name}: fusion {weights(model)} ({args.against} {weights(stage1)})"]
    for protocol in before:
        for name, a in after[protocol][model.query_mode].items():
            if "ranks" not in a:  # the average over the sets
                continue
            b = before[protocol][stage1.query_mode][name]
            result.setdefault(protocol, {})[name] = {
                "R@10": a["R@10"],
                "R@50": a["R@50"],
                "reliance": a.get("reliance"),
                args.against: {"R@10": b["R@10"], "R@50": b["R@50"]},
                "paired": paired(a["ranks"], b["ranks"]),
                "ranks": a["ranks"],
            }
            lines.append(
                f"  {protocol:8s} {name:14s} R@10 {a['R@10']:5.1f} ({args.against} {b['R@10']:5.1f}) "
                f"R@50 {a['R@50']:5.1f} ({args.against} {b['R@50']:5.1f}) | paired "
                + "  ".join(
                    f"{k} {d:+.1f} [{lo:+.1f},{hi:+.1f}]" for k, (d, lo, hi) in result[protocol][name]["paired"].items()
                )
            )
    if args.confirm:
        catalog = runner.catalog_
        triplets = [
            t
            for t in parse_triplets(
                read_json(runner.out / "triplets" / "val.json", "generated val triplets"), GENERATED_VAL
            )
            if t.candidate in catalog.image_paths and t.target in catalog.image_paths
        ]
        generated = TripletSet(
            GENERATED_VAL, triplets, list(catalog.split_paths("val")), dict(catalog.image_paths), [], 0
        )
        held_out = Evaluator(
            {GENERATED_VAL: generated},
            runner.cache,
            catalog.attributes,
            EvalOptions(ks=KS, progress=False, keep_ranks=True),
            None,
            runner.out / "evaluations",
            [catalog_protocol(runner.all_ids())],
        )
        a, b = (held_out(m)["catalog"][m.query_mode][GENERATED_VAL]["ranks"] for m in (model, stage1))
        result["generated_catalog"] = {"paired": paired(a, b), "ranks": a}
        lines.append(
            "  generated val, catalog: paired "
            + "  ".join(
                f"{k} {d:+.1f} [{lo:+.1f},{hi:+.1f}]"
                for k, (d, lo, hi) in result["generated_catalog"]["paired"].items()
            )
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(runner.out / f"sweep-{args.name}.json", result)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
