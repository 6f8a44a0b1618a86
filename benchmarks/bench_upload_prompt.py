"""Upload latency with and without the predicted prompt: the same uploaded photo and caption
searched (a) as before, caption only, and (b) with the attribute heads' description joined to the
caption. The difference is what the predicted prompt adds to an upload. Target: < 10 ms on CPU.

    .venv/bin/python benchmarks/bench_upload_prompt.py --model runs/demo/best [--n 40] [--threads 2]
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
from fashion_cir.models.attributes import describe
from fashion_cir.models.cir import load_model
from fashion_cir.retrieval import build_index
from fashion_cir.retrieval.index import encode_reference_image
from fashion_cir.retrieval.query import composed_search

CAPTIONS = ["is red with long sleeves", "is black and sleeveless", "is shorter and has a floral print", "is blue denim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder with attribute heads")
    parser.add_argument("--catalog", type=Path, default=None, help="clothing catalog (default ../shared/datasets/...)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache/features"), help="feature cache")
    parser.add_argument("--n", type=int, default=40, help="uploads (val images), each timed both ways")
    parser.add_argument("--gallery", type=int, default=563, help="indexed val images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    heads = model.attribute_heads
    if heads is None:
        raise SystemExit(f"{args.model} has no attribute heads: run `fashion-cir attributes train --model {args.model}`")
    catalog = load_clothing_catalog(args.catalog)
    val = catalog.split_paths("val")
    gallery = dict(list(val.items())[: args.gallery])
    uploads = [open_image(p) for p in list(val.values())[: args.n]]
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp) / "index", model, gallery, {i: catalog.attributes.get(i, {}) for i in gallery},
                            cache_dir=args.cache_dir, progress=False)
        for image in uploads[:3]:  # warm-up
            composed_search(model, index, image=image, text=CAPTIONS[0], k=24)
        plain, prompted, heads_only = [], [], []
        for number, image in enumerate(uploads):
            caption = CAPTIONS[number % len(CAPTIONS)]
            for with_heads in ((False, True) if number % 2 else (True, False)):  # interleaved order
                model.attach_heads(heads if with_heads else None)
                start = time.perf_counter()
                composed_search(model, index, image=image, text=caption, k=24)
                (prompted if with_heads else plain).append(1000 * (time.perf_counter() - start))
            features = encode_reference_image(model, image)
            start = time.perf_counter()
            describe(heads.predict(features)[0])
            heads_only.append(1000 * (time.perf_counter() - start))
        model.attach_heads(heads)
    p, q, h = statistics.median(plain), statistics.median(prompted), statistics.median(heads_only)
    print(f"uploads: {len(uploads)}, gallery: {len(gallery)}, torch threads: {args.threads}, model: {args.model}")
    print(f"median upload search, caption only:          {p:8.2f} ms")
    print(f"median upload search, predicted prompt:      {q:8.2f} ms")
    print(f"added by the predicted prompt (median diff): {q - p:8.2f} ms  (target < 10 ms)")
    print(f"  of which heads + description:              {h:8.2f} ms")
    print(f"ratio prompted / caption only:               {q / p:8.3f}")


if __name__ == "__main__":
    main()
