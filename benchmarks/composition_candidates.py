"""Composition candidates of issue 19, measured against the demo's selected fused model on val
(every val set, both protocols; paired bootstrap intervals over the same queries):

- ``fit-sources``: the fusion weights fitted on annotated training captions (what the demo does), on
  generated triplets only (change-only share 0, 0.5, 1) or on both;
- ``uploads``: a fusion fitted with *predicted* reference attributes (cross-fitted attribute heads:
  each half of the training images is described by heads trained on the other half), for uploads;
- ``rerank``: a learned second stage (a small MLP over the fusion's per-term scores and the fused
  score) re-ordering the first stage's top 100, trained listwise on the training captions;
- ``soft-rows``: the attribute block's ``want`` (and ``keep``) rows spread over how often a
  target has each value when a training caption asks for (keeps) a value, counted on the training
  captions, instead of one slot; the fusion refitted;
- ``upload-losses`` (a diagnostic, not a candidate): which of an upload's predicted attributes are
  wrong where the best model finds the target with the catalog's description and not without it;
  what each attribute would be worth read right (the catalog's value of that one attribute put into
  the predicted reference); whether averaging the heads over the photo and its mirror image reads
  the attributes better.

    nice -n 5 .venv/bin/python benchmarks/composition_candidates.py fit-sources --out runs/demo
    nice -n 5 .venv/bin/python benchmarks/composition_candidates.py uploads --out runs/demo
    nice -n 5 .venv/bin/python benchmarks/composition_candidates.py rerank --out runs/demo
    nice -n 5 .venv/bin/python benchmarks/composition_candidates.py upload-losses --out runs/demo
    nice -n 5 .venv/bin/python benchmarks/composition_candidates.py soft-rows --out runs/demo --effects want keep

Needs a finished demo run (its ``zero-shot-fused`` and ``best`` folders, feature cache and aligned
towers). Training data is the train split only; the test split is never read."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import time
from collections.abc import Mapping, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from fashion_cir.captioning import load_precomputed
from fashion_cir.data.triplets import TripletSet, parse_triplets
from fashion_cir.evaluation import evaluate
from fashion_cir.evaluation.evaluate import EvalOptions, PreparedSet, Protocol
from fashion_cir.evaluation.evaluator import Evaluator
from fashion_cir.evaluation.stats import paired_difference
from fashion_cir.language.changes import read_changes
from fashion_cir.models.attributes import describe, train_heads
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.fusion import AttributeSpace, Fusion
from fashion_cir.pipeline.recipe import load_recipe
from fashion_cir.pipeline.runner import Runner, source_name
from fashion_cir.training.fusion import fit_fusion
from fashion_cir.triplets import generate_triplets


def setup(args) -> Runner:
    recipe = load_recipe(args.recipe, overrides=[f"out={args.out}"] if args.out else ())
    runner = Runner(recipe, source=args.recipe)
    runner.catalog_ = runner.catalog()
    runner.towers(runner.catalog_)
    runner.evaluator_ = runner.evaluator()
    return runner


def train_protocol(runner: Runner) -> Protocol:
    return Protocol("train", tuple(runner.catalog_.splits["train"]), remove_reference=True)


def annotated_train(runner: Runner) -> dict[str, TripletSet]:
    return {source_name(s): runner.load_source(s, "train") for s in runner.recipe.annotated}


def fit(runner: Runner, model: CIRModel, sets: Mapping[str, TripletSet], describe: str = "catalog") -> Fusion:
    fitter = Evaluator(dict(sets), runner.cache, runner.catalog_.attributes, None, None, None, [train_protocol(runner)])
    prepared = fitter.prepare(model, EvalOptions(progress=False, describe=describe), all_terms=True)
    fusion, summary = fit_fusion(prepared, "train")
    runner.log(f"fitted on {summary['queries']} queries: loss {summary['loss_plain_composed']} -> {summary['loss']}")
    return fusion


def report(
    runner: Runner, model: CIRModel, fusions: Mapping[str, Fusion], against: str, describe: str = "catalog", sets=None
) -> None:
    """R@10/R@50, reliance, and each fusion's paired R@10 difference to ``against``."""
    options = EvalOptions(progress=False, describe=describe, keep_ranks=True, reliance=True)
    prepared = runner.evaluator_.prepare(model, options)
    for protocol in ("split", "catalog"):
        for name, p in prepared.items():
            if sets and name not in sets:
                continue
            ranks = {label: p.ranks(protocol, None, f) for label, f in fusions.items()}
            for label, f in fusions.items():
                shuffled = p.ranks(protocol, None, f, shuffled=True)
                reliance = paired_difference(ranks[label], shuffled, 10)
                line = (
                    f"{describe:9s} {protocol:7s} {name:13s} {label:10s} R@10 {100 * np.mean(ranks[label] < 10):5.1f} "
                    f"R@50 {100 * np.mean(ranks[label] < 50):5.1f} reliance {reliance[0]:+.1f} "
                    f"[{reliance[1]:+.1f}, {reliance[2]:+.1f}]"
                )
                if label != against:
                    d = paired_difference(ranks[label], ranks[against], 10)
                    line += f" | - {against}: {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]"
                print(line, flush=True)


def fit_sources(args) -> None:
    runner = setup(args)
    model = CIRModel.load(runner.out / "zero-shot-fused")
    catalog = runner.catalog_
    attributes = load_precomputed(catalog.attributes_file)
    paths = {i: p for i, p in catalog.split_paths("train").items() if i in attributes}
    ids, features = runner.cache.encode(model.backbone, paths, on_error="skip")
    annotated = annotated_train(runner)
    count = sum(len(s.triplets) for s in annotated.values())

    def generated(share: float) -> TripletSet:
        config = runner.recipe.generate["train"].model_copy(update={"change_only_share": share})
        triplets, _ = generate_triplets(attributes, features, ids, config, train_ids=ids)
        triplets = random.Random(0).sample(triplets, min(count, len(triplets)))  # as many as the annotated
        name = f"generated-{share}"
        paths = dict(catalog.image_paths)
        return TripletSet(name, parse_triplets(triplets, name), list(catalog.splits["train"]), paths, [], 0)

    fusions = {"annotated": fit(runner, model, annotated)}
    for share in (0.0, 0.5, 1.0):
        fusions[f"gen{share:g}"] = fit(runner, model, {"generated": generated(share)})
    fusions["both"] = fit(runner, model, {**annotated, "generated": generated(0.5)})
    report(runner, model, fusions, "annotated")


def uploads(args) -> None:
    runner = setup(args)
    model = CIRModel.load(runner.out / "best")
    if model.attribute_heads is None:
        raise SystemExit(f"{runner.out / 'best'} has no attribute heads (run the demo to the end)")
    catalog, heads = runner.catalog_, model.attribute_heads
    fold = {i: int(hashlib.sha1(i.encode()).hexdigest(), 16) % 2 for i in catalog.splits["train"]}
    encoded = {}
    for split in ("train", "val"):
        paths = {i: p for i, p in catalog.split_paths(split).items() if i in catalog.attributes}
        encoded[split] = runner.cache.encode(model.backbone, paths, on_error="skip")
    (train_ids, train_x), (val_ids, val_x) = encoded["train"], encoded["val"]
    val_records = [catalog.attributes[i] for i in val_ids]
    fold_heads = {}
    for k in (0, 1):  # heads for fold k's references never saw fold k's images
        rows = [n for n, i in enumerate(train_ids) if fold[i] != k]
        fold_heads[k] = train_heads(train_x[rows], [catalog.attributes[train_ids[n]] for n in rows], val_x, val_records)
    prepared: dict[str, PreparedSet] = {}
    fitter_options = EvalOptions(progress=False, describe="predicted")
    for k in (0, 1):
        model.attach_heads(fold_heads[k])
        sets = {
            f"{name}-fold{k}": dataclasses.replace(s, triplets=[t for t in s.triplets if fold.get(t.candidate) == k])
            for name, s in annotated_train(runner).items()
        }
        fitter = Evaluator(sets, runner.cache, catalog.attributes, None, None, None, [train_protocol(runner)])
        prepared.update(fitter.prepare(model, fitter_options, all_terms=True))
    model.attach_heads(heads)
    predicted_fit, summary = fit_fusion(prepared, "train")
    runner.log(f"predicted-reference fit: loss {summary['loss_plain_composed']} -> {summary['loss']}")
    fusions = {"demo": model.fusion, "predicted": predicted_fit}
    report(runner, model, fusions, "demo", describe="predicted")
    report(runner, model, fusions, "demo", describe="catalog")


ATTRIBUTES = ("category", "color", "pattern", "sleeves", "neckline", "length", "material", "closure")


def upload_losses(args) -> None:
    """Per val set (catalog protocol, R@10): queries found with the catalog's description of the
    reference but not with the predicted one ("lost"), found with both ("kept"), and the share of
    each group whose reference has each attribute predicted wrong."""
    runner = setup(args)
    model = CIRModel.load(runner.out / "best")
    if model.attribute_heads is None:
        raise SystemExit(f"{runner.out / 'best'} has no attribute heads (run the demo to the end)")
    catalog = runner.catalog_
    ranks = {}
    for source in ("catalog", "predicted"):
        prepared = runner.evaluator_.prepare(model, EvalOptions(progress=False, describe=source))
        ranks[source] = {name: p.ranks("catalog") for name, p in prepared.items()}
    for name, p in prepared.items():  # the same queries under either description
        queries = p.triplets
        references = sorted({t.candidate for t in queries})
        ids, features = runner.cache.encode(model.backbone, {i: catalog.image_paths[i] for i in references})
        predicted = dict(zip(ids, model.predict_attributes(torch.from_numpy(features))))
        found = {d: ranks[d][name] < 10 for d in ranks}
        groups = {"lost": found["catalog"] & ~found["predicted"], "kept": found["catalog"] & found["predicted"]}
        groups["won"] = ~found["catalog"] & found["predicted"]
        groups["all"] = np.ones_like(found["catalog"])
        print(
            f"{name}: R@10 catalog {100 * found['catalog'].mean():.1f}, predicted {100 * found['predicted'].mean():.1f}"
        )
        for group, mask in groups.items():
            chosen = [t.candidate for t, m in zip(queries, mask) if m]
            wrong = {
                a: np.mean([str(predicted[i][a]["value"]) != str(catalog.attributes[i].get(a)) for i in chosen])
                for a in ATTRIBUTES
            }
            shares = " ".join(f"{a} {100 * w:3.0f}" for a, w in wrong.items()) if chosen else "-"
            print(f"  {group:5s} {len(chosen):4d} queries, % with the attribute predicted wrong: {shares}", flush=True)
    catalog_values(runner, model, prepared)  # prepared: the predicted references' sets
    mirrored_heads(runner, model)


def with_catalog_values(names: Sequence[str], records: Mapping[str, Mapping]):
    """``resolve_references`` whose predicted references take the catalog's value of ``names``
    (confidence 1) and are described again from the result."""
    resolve = evaluate.resolve_references

    def resolved(model, policy, ids, *rest, **options):
        out = resolve(model, policy, ids, *rest, **options)
        for item_id, reference in zip(ids, out):
            if reference.source == "predicted" and item_id in records:
                for name in names:
                    reference.attributes[name] = {"value": records[item_id].get(name), "confidence": 1.0}
                reference.description = describe(reference.attributes)
        return out

    return resolved


def protocol_ranks(prepared: Mapping[str, PreparedSet]) -> dict[tuple[str, str], np.ndarray]:
    return {(name, protocol): p.ranks(protocol) for name, p in prepared.items() for protocol in ("split", "catalog")}


def catalog_values(runner: Runner, model: CIRModel, predicted_sets: Mapping[str, PreparedSet]) -> None:
    """R@10 of predicted references with one attribute (then all) read right, paired with predicted."""
    predicted = protocol_ranks(predicted_sets)
    print("predicted references with the catalog's value of ... (R@10, minus predicted):")
    for names in [[a] for a in ATTRIBUTES] + [list(ATTRIBUTES)]:
        with mock.patch.object(evaluate, "resolve_references", with_catalog_values(names, runner.catalog_.attributes)):
            read_right = protocol_ranks(
                runner.evaluator_.prepare(model, EvalOptions(progress=False, describe="predicted"))
            )
        cells = []
        for (name, protocol), found in read_right.items():
            d = paired_difference(found, predicted[name, protocol], 10)
            cells.append(f"{name} {protocol} {100 * np.mean(found < 10):.1f} ({d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}])")
        print(f"  {'all' if len(names) > 1 else names[0]:9s} " + "; ".join(cells), flush=True)


@torch.no_grad()
def mirrored_heads(runner: Runner, model: CIRModel, batch: int = 32) -> None:
    """The heads' val accuracy per attribute on the photo, and on the mean of the photo's and its
    mirror image's class probabilities."""
    catalog, heads = runner.catalog_, model.attribute_heads
    ids = [i for i in catalog.splits["val"] if i in catalog.attributes]
    right = {name: [0, 0] for name in ATTRIBUTES}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        photos = [Image.open(catalog.image_paths[i]).convert("RGB") for i in chunk]
        plain, mirrored = (
            heads(model.backbone.encode_images(torch.stack([model.backbone.preprocess(f(p)) for p in photos])))
            for f in (lambda p: p, ImageOps.mirror)
        )
        for name in ATTRIBUTES:
            classes = [str(c) for c in heads.classes[name]]
            for row, item_id in enumerate(chunk):
                true = str(catalog.attributes[item_id].get(name))
                right[name][0] += classes[int(plain[name][row].argmax())] == true
                right[name][1] += classes[int((plain[name][row] + mirrored[name][row]).argmax())] == true
    shares = ", ".join(f"{n} {100 * a / len(ids):.1f} -> {100 * b / len(ids):.1f}" for n, (a, b) in right.items())
    print(f"heads' val accuracy ({len(ids)} photos), photo -> photo and mirror image: {shares}", flush=True)


class Reranker(nn.Module):
    """fused score x a learned scale + an MLP of the standardised term scores and the fused score."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Linear(len(mean) + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.scale = nn.Parameter(torch.tensor(17.0))

    def forward(self, terms: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(terms - self.mean) / self.std, 10 * fused[..., None]], -1)
        return self.scale * fused + self.net(x).squeeze(-1)


def candidates(prepared: PreparedSet, protocol: str, fusion: Fusion, k: int):
    """Per query: the top-``k`` candidates' term scores [Q, k, T] and fused scores [Q, k], the
    target's place among them (-1: outside) and its first-stage rank."""
    terms = prepared.term_scores(protocol)
    names = sorted(terms)
    weights = torch.tensor([fusion.weight(n) for n in names])
    scores = torch.stack([terms[n] for n in names], -1)
    fused = scores @ weights
    references = prepared.reference_columns(protocol)
    if references is not None:
        rows = torch.from_numpy(references)
        fused[(rows >= 0).nonzero().squeeze(1), rows[rows >= 0]] = float("-inf")
    target = torch.from_numpy(prepared.target_columns(protocol))
    top = fused.topk(k, dim=1).indices
    place = torch.where((top == target[:, None]).any(1), (top == target[:, None]).float().argmax(1), -1)
    first = (fused > fused.gather(1, target.clamp(min=0)[:, None])).sum(1)
    first[target < 0] = np.iinfo(np.int32).max
    gathered = torch.gather(scores, 1, top[..., None].expand(-1, -1, scores.shape[-1]))
    return gathered, torch.gather(fused, 1, top), place, first


def rerank(args) -> None:
    runner = setup(args)
    model = CIRModel.load(runner.out / "zero-shot-fused")
    records, protocols = runner.catalog_.attributes, [train_protocol(runner)]
    fitter = Evaluator(annotated_train(runner), runner.cache, records, None, None, None, protocols)
    parts = [
        candidates(p, "train", model.fusion, args.candidates)
        for p in fitter.prepare(model, EvalOptions(progress=False), all_terms=True).values()
    ]
    terms, fused, place = (torch.cat([p[i] for p in parts]) for i in range(3))
    inside = place >= 0
    terms, fused, place = terms[inside], fused[inside], place[inside]
    runner.log(f"{int(inside.sum())} training queries have their target in the top {args.candidates}")
    flat = terms.reshape(-1, terms.shape[-1])
    results = {}
    for steps in args.steps:
        torch.manual_seed(0)
        reranker = Reranker(flat.mean(0), flat.std(0) + 1e-6)
        optimiser = torch.optim.AdamW(reranker.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(steps):
            loss = F.cross_entropy(reranker(terms, fused), place)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            runner.log(f"{steps} steps: training loss {float(F.cross_entropy(reranker(terms, fused), place)):.4f}")
        results[steps] = reranker
    val = runner.evaluator_.prepare(model, EvalOptions(progress=False), all_terms=True)
    for protocol in ("split", "catalog"):
        for name, p in val.items():
            terms, fused, place, first = candidates(p, protocol, model.fusion, args.candidates)
            base = first.numpy()
            for steps, reranker in results.items():
                with torch.no_grad():
                    order = reranker(terms, fused).argsort(1, descending=True)
                moved = (order == place.clamp(min=0)[:, None]).float().argmax(1)
                ranks = np.where(place.numpy() >= 0, moved.numpy(), base)
                d = paired_difference(ranks, base, 10)
                print(
                    f"{protocol:7s} {name:13s} steps {steps:4d} R@10 first stage {100 * np.mean(base < 10):5.1f} "
                    f"re-ranked {100 * np.mean(ranks < 10):5.1f} paired {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]",
                    flush=True,
                )


class SpreadRows(AttributeSpace):
    """An attribute space whose rows of ``effects`` are spread by ``spread`` [dim, dim]: row @ spread."""

    def __init__(self, space: AttributeSpace, spread: dict[str, torch.Tensor]):
        super().__init__(space.vocabulary, space.names)
        self.spread = spread

    def query_rows(self, reference, changes):
        rows = super().query_rows(reference, changes)
        return {
            t: row @ self.spread[t.split(":")[0]] if t.split(":")[0] in self.spread else row for t, row in rows.items()
        }


def value_spread(space: AttributeSpace, sets: Mapping[str, TripletSet], records, smoothing: float) -> dict:
    """Per effect (want, keep), [dim, dim]: per attribute, P(target's value | the value a training
    caption asks for / the reference's value of an attribute it does not mention), with
    ``smoothing`` added to the value itself."""
    counts = {e: torch.zeros(space.dim, space.dim) for e in ("want", "keep")}
    for s in sets.values():
        for t in s.triplets:
            reference, target = records.get(t.candidate), records.get(t.target)
            if not reference or not target:
                continue
            for caption in t.captions:
                changes = read_changes(caption)
                for name in space.names:
                    to = space._slot(name, target.get(name))
                    asked = [space._slot(name, v) for v in changes.wanted.get(name, [])]
                    kept = [] if name in changes.mentioned else [space._slot(name, reference.get(name))]
                    for effect, slots in (("want", asked), ("keep", kept)):
                        for slot in slots:
                            if slot is not None and to is not None:
                                counts[effect][slot, to] += 1
    out = {}
    for effect, c in counts.items():
        c = c + smoothing * torch.eye(space.dim)
        out[effect] = c / c.sum(1, keepdim=True)  # each value's row lies in its own attribute's slots
    return out


def soft_rows(args) -> None:
    runner = setup(args)
    model = CIRModel.load(runner.out / "best")
    space, records, annotated = model.attribute_space, runner.catalog_.attributes, annotated_train(runner)
    spread = value_spread(space, annotated, records, args.smoothing)
    options = EvalOptions(progress=False, keep_ranks=True, reliance=True)
    ranks = {}
    for label, rows in (("one-slot", space), ("spread", SpreadRows(space, {e: spread[e] for e in args.effects}))):
        model.attribute_space = rows
        fusion = fit(runner, model, annotated)
        for name, p in runner.evaluator_.prepare(model, options).items():
            for protocol in ("split", "catalog"):
                ranks[label, name, protocol] = (p.ranks(protocol, None, fusion), p.ranks(protocol, None, fusion, True))
    for (label, name, protocol), (true, shuffled) in ranks.items():
        if label == "spread":
            base = ranks["one-slot", name, protocol][0]
            d, r = paired_difference(true, base, 10), paired_difference(true, shuffled, 10)
            print(
                f"{protocol:7s} {name:13s} R@10 one slot {100 * np.mean(base < 10):5.1f} spread "
                f"{100 * np.mean(true < 10):5.1f} paired {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] reliance {r[0]:+.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    candidates = {
        "fit-sources": fit_sources,
        "uploads": uploads,
        "rerank": rerank,
        "upload-losses": upload_losses,
        "soft-rows": soft_rows,
    }
    parser.add_argument("candidate", choices=list(candidates))
    parser.add_argument("--recipe", default="configs/demo_clothing.json")
    parser.add_argument("--out", help="the demo run's folder (default: the recipe's out)")
    parser.add_argument("--candidates", type=int, default=100, help="rerank: first-stage candidates per query")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 200, 500], help="rerank: training steps tried")
    parser.add_argument("--effects", nargs="+", default=["want"], help="soft-rows: the effects spread (want, keep)")
    parser.add_argument("--smoothing", type=float, default=2.0, help="soft-rows: counts added to the value itself")
    args = parser.parse_args()
    started = time.perf_counter()
    candidates[args.candidate](args)
    print(f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
