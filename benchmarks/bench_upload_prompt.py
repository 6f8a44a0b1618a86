"""Upload latency with and without the predicted prompt: the same uploaded photo and caption
searched (a) caption only, as an upload was before, and (b) with the attribute heads' description
joined to the caption, one after the other (order alternating) in one run. The paired difference
is what the predicted prompt adds to an upload: heads forward + description + fitting the prompt to
the text context + encoding the longer text. Target: < 10 ms on CPU.

Also times those parts alone on the same uploads, so the added cost can be read part by part, and
prints the load average before and after. Each time is taken on two clocks: wall clock (what a user
waits; on a loaded machine it includes waiting for a core) and this process's CPU time (what the
work costs; with several torch threads it adds up their time, spinning included).

    .venv/bin/python benchmarks/bench_upload_prompt.py --model runs/demo/best --cache-dir runs/demo/features [--n 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fashion_cir.data.catalog import load_clothing_catalog
from fashion_cir.data.images import open_image
from fashion_cir.models.attributes import describe
from fashion_cir.models.cir import load_model
from fashion_cir.retrieval import build_index
from fashion_cir.retrieval.query import composed_search, encode_reference_image

CAPTIONS = ["is red with long sleeves", "is black and sleeveless", "is shorter and has a floral print", "is blue denim"]


def timed(call) -> tuple[dict[str, float], object]:
    """{"wall": ms, "cpu": ms of this process's CPU time} of one call, and its result. On a loaded
    machine the wall time includes waiting for a core; the CPU time does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return {"wall": 1000 * (time.perf_counter() - wall), "cpu": 1000 * (time.process_time() - cpu)}, result


def quartiles(values: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:8.2f} ms ({q1:.2f} .. {q3:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder with attribute heads")
    parser.add_argument(
        "--catalog", type=Path, default=Path("../shared/datasets/clothing-dataset"), help="clothing catalog folder"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache/features"), help="feature cache")
    parser.add_argument(
        "--n", type=int, default=200, help="uploads (val images, repeated if fewer), each timed both ways"
    )
    parser.add_argument("--gallery", type=int, default=563, help="indexed val images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = load_model(args.model)
    model.eval()
    heads = model.attribute_heads
    if heads is None:
        raise SystemExit(
            f"{args.model} has no attribute heads: run `fashion-cir attributes train --model {args.model}`"
        )
    catalog = load_clothing_catalog(args.catalog)
    val = list(catalog.split_paths("val").items())
    gallery = dict(val[: args.gallery])
    uploads = [open_image(val[i % len(val)][1]) for i in range(args.n)]
    rows = [
        "upload search, caption only",
        "upload search, predicted prompt",
        "added by the predicted prompt (paired)",
        "part: heads + description",
        "part: prompt fitted to the context",
        "part: text encode, caption only",
        "part: text encode, prompt + caption",
    ]
    times: dict[str, dict[str, list[float]]] = {row: {"wall": [], "cpu": []} for row in rows}

    def record(row: str, took: dict[str, float]) -> None:
        for clock, value in took.items():
            times[row][clock].append(value)

    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(
            Path(tmp) / "index",
            model,
            gallery,
            {i: catalog.attributes.get(i, {}) for i in gallery},
            cache_dir=args.cache_dir,
            progress=False,
        )
        print(f"index of {len(gallery)} items built; timing {len(uploads)} uploads", file=sys.stderr, flush=True)
        for image in uploads[:5]:  # warm-up
            composed_search(model, index, image=image, text=CAPTIONS[0], k=24)
        for number, image in enumerate(uploads):
            caption = CAPTIONS[number % len(CAPTIONS)]
            if number % 20 == 0:
                print(f"upload {number}/{len(uploads)}", file=sys.stderr, flush=True)
            search = {}
            for with_heads in (False, True) if number % 2 else (True, False):  # alternating order
                model.attach_heads(heads if with_heads else None)
                search[with_heads], result = timed(
                    lambda: composed_search(model, index, image=image, text=caption, k=24)
                )
                assert (result.prompt_source == "predicted") == with_heads, result.prompt_source
            model.attach_heads(heads)
            record(rows[0], search[False])
            record(rows[1], search[True])
            record(rows[2], {clock: search[True][clock] - search[False][clock] for clock in search[True]})
            features = encode_reference_image(model, image)
            with torch.no_grad():
                took, description = timed(lambda: describe(heads.predict(features)[0]))
                record(rows[3], took)
                took, text = timed(lambda: model.query_text(caption, description))
                record(rows[4], took)
                record(rows[5], timed(lambda: model.backbone.embed_texts([caption]))[0])
                record(rows[6], timed(lambda: model.backbone.embed_texts([text]))[0])
    load_after = os.getloadavg()
    print(
        f"model: {args.model}, backbone: {type(model.backbone).__name__}, matcher: "
        f"{model.matcher.config() if model.matcher is not None else None}"
    )
    print(
        f"uploads: {len(uploads)}, gallery: {len(gallery)}, torch threads: {torch.get_num_threads()}, "
        f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min), cpus: {os.cpu_count()}"
    )
    print(f"example prompt: {text!r}")
    print(f"medians (quartiles) over {len(uploads)} uploads; target: added < 10 ms")
    print(f"{'':<40} {'wall clock':<32} {'process CPU time':<32}")
    for row in rows:
        print(f"{row:<40} {quartiles(times[row]['wall']):<32} {quartiles(times[row]['cpu']):<32}")
    for clock in ("wall", "cpu"):
        plain, prompted = (statistics.median(times[row][clock]) for row in rows[:2])
        print(
            f"{clock}: difference of the medians {prompted - plain:.2f} ms, ratio prompted / caption only {prompted / plain:.3f}"
        )


if __name__ == "__main__":
    main()
