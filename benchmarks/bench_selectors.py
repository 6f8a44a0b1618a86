"""What leaving rows out of a FAISS search costs at 1M items: the round-4 way (an IDSelectorBatch
of every allowed row, built per query), a bitmap selector (what a filtered search now uses), and a
deeper unfiltered search that drops the excluded rows (what excluding a reference now does).
Random vectors; IVF1024,Flat at nprobe 64; one thread. Prints ms per query and ratios.

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_selectors.py --n 1000000
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    queries = vectors[: args.queries] + 0.1
    index = faiss.index_factory(args.dim, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:50_000])
    index.add(vectors)
    index.nprobe = 64
    excluded = [7]

    def allowed() -> np.ndarray:
        mask = np.ones(args.n, bool)
        mask[excluded] = False
        return mask

    def batch_selector(query: np.ndarray):
        selector = faiss.IDSelectorBatch(np.flatnonzero(allowed()).astype(np.int64))
        return index.search(query, 10, params=faiss.SearchParametersIVF(sel=selector, nprobe=64))

    def bitmap_selector(query: np.ndarray):
        bitmap = np.packbits(allowed(), bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        return index.search(query, 10, params=faiss.SearchParametersIVF(sel=selector, nprobe=64))

    def deeper_search(query: np.ndarray):
        scores, rows = index.search(query, 10 + len(excluded))
        keep = ~np.isin(rows[0], excluded)
        return scores[0][keep][:10], rows[0][keep][:10]

    timings = {}
    for search in (batch_selector, bitmap_selector, deeper_search):
        start = time.perf_counter()
        for query in queries:
            search(query[None])
        timings[search.__name__] = (time.perf_counter() - start) * 1000 / len(queries)
    base = timings["batch_selector"]
    for name, ms in timings.items():
        print(f"{name:16s} {ms:8.2f} ms/query   {base / ms:6.1f}x faster than batch_selector")
    same = [batch_selector(q[None])[1][0].tolist() == deeper_search(q[None])[1].tolist() for q in queries]
    print(f"same top 10 (batch selector vs deeper search): {sum(same)}/{len(same)} queries")


if __name__ == "__main__":
    main()
