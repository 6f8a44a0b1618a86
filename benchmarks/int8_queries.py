"""The int8 query encoder (issue 23: a cheaper query), against the exact one on the demo's best model:

1. quality: R@10 on every val set, both protocols, the exact query encoder (PyTorch) vs the int8
   ONNX one (`DescriptionMatcher.use_onnx(query_int8=True)`; the item bank stays exact), with the
   paired difference and its 95% interval over the same queries;
2. cost: ms per search's text pass ([reference description, caption] of real val queries),
   ONNX Runtime fp32 vs int8, alternating, on this machine's threads; and how far the features move
   (cosine to the exact ones).

    .venv/bin/python benchmarks/int8_queries.py --out runs/demo

Needs a finished demo run. The test split is never read. The service side by side:
`benchmarks/bench_scale.py --serve N --serve-engines fp32 int8`."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from composition_candidates import setup
from fashion_cir.evaluation.evaluate import EvalOptions
from fashion_cir.evaluation.stats import paired_difference
from fashion_cir.models.cir import CIRModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/demo_clothing.json")
    parser.add_argument("--out", help="the demo run's folder (default: the recipe's out)")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds over the texts, alternating")
    args = parser.parse_args()
    started = time.perf_counter()
    runner = setup(args)
    model = CIRModel.load(runner.out / "best")
    matcher = model.matcher
    if matcher is None:
        raise SystemExit(f"{runner.out / 'best'} has no description matcher: nothing to quantize")
    records = runner.catalog_.attributes
    texts = [  # what a search's one pass reads: the query text (description joined with the caption), the caption
        [model.query_text(caption, records.get(t.candidate, {}).get("description")), caption]
        for s in runner.evaluator_.sets.values()
        for t in s.triplets[:40]
        for caption in [" and ".join(t.captions)]
    ]
    exact_features = torch.cat([matcher.embed(pair, "query") for pair in texts])  # PyTorch: no engine yet
    options = EvalOptions(progress=False, keep_ranks=True)
    ranks = {}
    for engine in ("exact", "int8"):
        if engine == "int8" and not matcher.use_onnx(query_int8=True):
            raise SystemExit("onnxruntime is not available (or switched off): no int8 engine")
        for name, prepared in runner.evaluator_.prepare(model, options).items():
            for protocol in ("split", "catalog"):
                ranks[engine, name, protocol] = prepared.ranks(protocol, None, model.fusion)
    for (engine, name, protocol), got in ranks.items():
        if engine == "int8":
            exact = ranks["exact", name, protocol]
            d = paired_difference(got, exact, 10)
            print(
                f"{protocol:7s} {name:13s} R@10 exact {100 * np.mean(exact < 10):5.1f} int8 {100 * np.mean(got < 10):5.1f}"
                f" paired {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] ({len(got)} queries)",
                flush=True,
            )
    labels = {"fp32": False, "int8": True}
    cosine = {}
    for label, int8 in labels.items():
        matcher.use_onnx(query_int8=int8)
        cosine[label] = float(
            (torch.cat([matcher.embed(pair, "query") for pair in texts]) * exact_features).sum(1).min()
        )
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in list(labels)[:: 1 if r % 2 == 0 else -1]:
            matcher.use_onnx(query_int8=labels[label])  # a fresh session, outside the timed part
            start = time.perf_counter()
            for pair in texts:
                matcher.embed(pair, "query")
            times[label].append((time.perf_counter() - start) / len(texts) * 1000)
    fp32, int8 = (float(np.median(times[label])) for label in ("fp32", "int8"))
    print(
        f"text pass per search ({torch.get_num_threads()} threads, {len(texts)} real [prompt, caption] pairs, "
        f"median of {args.rounds} rounds): fp32 {fp32:.2f} ms, int8 {int8:.2f} ms, {fp32 / int8:.2f}x; "
        f"lowest cosine to the exact features: fp32 {cosine['fp32']:.4f}, int8 {cosine['int8']:.4f}",
        flush=True,
    )
    print(f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
