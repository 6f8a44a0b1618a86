"""Feature extraction: the cached pipeline (read, hash, decode, preprocess, forward, write shards)
versus the bare model forward on the same, already-preprocessed batches. Target: < 15% overhead.

    .venv/bin/python benchmarks/bench_features.py [--n 256] [--backbones tiny,offline,openclip:ViT-B-32:random]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fashion_cir.data.catalog import load_clothing_catalog
from fashion_cir.data.images import open_image
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.factory import create_backbone


def bare_forward(backbone, tensors: list[torch.Tensor], batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(tensors), batch_size):
            backbone.encode_images(torch.stack(tensors[i : i + batch_size]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--backbones", default="tiny,offline,openclip:ViT-B-32:random")
    parser.add_argument("--catalog", type=Path, default=Path("../shared/datasets/clothing-dataset"))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians are reported")
    args = parser.parse_args()

    catalog = load_clothing_catalog(args.catalog)
    paths = dict(list(catalog.split_paths("train").items())[: args.n])
    print(
        f"{len(paths)} clothing images, batch {args.batch_size}, {args.workers} decode workers, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"medians of {args.repeats} interleaved runs")
    print(f"{'backbone':<26}{'bare img/s':>12}{'cached cold img/s':>19}{'overhead':>10}{'warm re-run s':>15}")
    for spec in args.backbones.split(","):
        backbone = create_backbone(spec).eval()
        tensors = [backbone.preprocess(open_image(p)) for p in paths.values()]
        bare_forward(backbone, tensors[: args.batch_size], args.batch_size)  # warm-up
        bare_runs, cold_runs = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both sides alike
            bare_runs.append(bare_forward(backbone, tensors, args.batch_size))
            with tempfile.TemporaryDirectory() as tmp:
                cache = FeatureCache(tmp)
                start = time.perf_counter()
                cache.encode(backbone, paths, args.batch_size, args.workers, progress=False)
                cold_runs.append(time.perf_counter() - start)
                start = time.perf_counter()
                cache.encode(backbone, paths, args.batch_size, args.workers, progress=False)
                warm = time.perf_counter() - start
        bare, cold = statistics.median(bare_runs), statistics.median(cold_runs)
        n = len(paths)
        print(f"{spec:<26}{n / bare:>12.1f}{n / cold:>19.1f}{(cold / bare - 1) * 100:>9.1f}%{warm:>15.2f}")


if __name__ == "__main__":
    main()
