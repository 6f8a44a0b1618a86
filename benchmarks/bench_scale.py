"""Scale benchmark (issue 23 items 2-4): N catalog items of a real model's item width, FAISS index
kinds side by side, two-stage search, memory-mapped opening, milvus-lite and the service.

1. Real items: the stored rows of an index folder built with the model a shop would deploy
   (``--index``, e.g. the demo's: [image 256 | description 384 | attributes 100] = 740 values),
   as the item vectors the index searches (image block normalised).
2. The mixture: k-means (``--components``) over the continuous blocks; per cluster a Gaussian
   with the members' mean and shrunk covariance 0.9 S + 0.1 tr(S)/d I, sampled in low-rank form
   (no d x d matrix), each continuous block renormalised to unit length; the attribute block
   (one-hots) is copied from a random member of the cluster. ``--n`` items = the real ones + samples.
3. Queries: real composed queries of the index's model (``--queries``): random catalog items as
   references with captions, encoded exactly as ``composed_search`` does (reference description
   and attributes, text tower, matcher, fusion). Ground truth: exact inner products (numpy).
4. Per FAISS index (``--indexes``, ``_`` for ``,``): build s (train + add; an IVF index with as
   many lists as an earlier one reuses its centroids, ``centroids_reused``), file MB, RSS added by
   a memory-mapped open (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``, checked to answer as the
   in-memory index), recall@10, p50/p95 ms per query, one query per call, 1 thread (full-scan
   indexes, Flat and SQ, time the first ``--scan-queries`` queries only).
5. Two-stage (``--two-stage``: the base index, ``--candidates``): the store's candidates re-scored
   exactly from the float32 rows (a memory-mapped ``.npy``) through
   :func:`fashion_cir.retrieval.rescore.two_stage_search`; recall@10 and p50/p95.
6. ``--milvus``: milvus-lite FLAT / IVF_FLAT (``bench_ann.bench_milvus``; mean ms per query).
7. ``--serve N --clients 1 4 16``: the real service (uvicorn, the index's model, text encoding
   included) over an N-item index (the real items + samples; ``--serve-factory``,
   ``--serve-candidates``, ``--serve-mmap``), ``POST /search`` by catalog id with a caption;
   ``--serve-engines fp32 int8 --serve-rounds 2``: the exact and the int8 query encoder side by
   side, a fresh server each, their order alternating by round.

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 nice -n 10 python benchmarks/bench_scale.py \\
        --index /work/lead/after-demo/index --n 20000 --queries 100 --json runs/bench-scale/20k.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
K = 10
CONTINUOUS_NORMALISED = ("image", "description")  # blocks the model keeps at unit length


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(row: dict) -> None:
    print(json.dumps(row), flush=True)


# -- data --------------------------------------------------------------------------------------
def real_items(folder: Path):
    from fashion_cir.retrieval.folder import index_model, open_index
    from fashion_cir.retrieval.store import item_vectors

    model = index_model(folder)
    index = open_index(folder, model, read_only=True)
    ids = list(index.ids)
    return model, index, ids, item_vectors(index.stored_rows(ids), index.config)


class Mixture:
    """A Gaussian mixture over the continuous blocks (low-rank sampling), discrete blocks copied."""

    def __init__(self, vectors: np.ndarray, blocks: dict[str, int], components: int, seed: int):
        bounds, start = {}, 0
        for name, width in blocks.items():
            bounds[name] = (start, start + width)
            start += width
        self.bounds = bounds
        self.continuous = np.concatenate([np.arange(*bounds[name]) for name in blocks if name in CONTINUOUS_NORMALISED])
        self.discrete = np.setdiff1d(np.arange(vectors.shape[1]), self.continuous)
        part = np.ascontiguousarray(vectors[:, self.continuous])
        kmeans = faiss.Kmeans(part.shape[1], components, niter=20, seed=seed)
        kmeans.train(part)
        labels = kmeans.index.search(part, 1)[1][:, 0]
        self.clusters = []
        for c in range(components):
            members = vectors[labels == c]
            if len(members) < 2:
                continue
            cont = members[:, self.continuous]
            centered = (cont - cont.mean(0)) / np.sqrt(len(members) - 1)
            noise = np.sqrt(0.1 * (centered**2).sum() / cont.shape[1])
            self.clusters.append(
                (len(members), cont.mean(0), np.sqrt(0.9) * centered, noise, members[:, self.discrete])
            )
        weights = np.array([c[0] for c in self.clusters], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.width, self.blocks = vectors.shape[1], blocks

    def sample(self, n: int, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
        """``n`` items (written into ``out`` when given: no second copy of a large base)."""
        out = np.empty((n, self.width), dtype=np.float32) if out is None else out
        which = rng.choice(len(self.clusters), size=n, p=self.weights)
        for c in np.unique(which):
            rows = np.flatnonzero(which == c)
            _, mean, factor, noise, discrete = self.clusters[c]
            z = rng.standard_normal((len(rows), len(factor)), dtype=np.float32)
            eps = rng.standard_normal((len(rows), len(mean)), dtype=np.float32)
            out[np.ix_(rows, self.continuous)] = mean + z @ factor + noise * eps
            out[np.ix_(rows, self.discrete)] = discrete[rng.integers(0, len(discrete), len(rows))]
        for name in CONTINUOUS_NORMALISED:
            if name in self.bounds:
                lo, hi = self.bounds[name]
                out[:, lo:hi] /= np.linalg.norm(out[:, lo:hi], axis=1, keepdims=True)
        return out


def real_queries(model, index, count: int, rng: np.random.Generator) -> np.ndarray:
    """Composed queries as ``composed_search`` builds them: catalog references + captions."""
    import torch

    from bench_search import CAPTIONS
    from fashion_cir.retrieval.policy import ReferencePolicy, resolve_references

    ids = [str(i) for i in rng.choice(index.ids, size=count, replace=False)]
    captions = [CAPTIONS[n % len(CAPTIONS)] for n in range(count)]
    features = torch.from_numpy(index.stored_rows(ids)[:, : int(index.config["feature_dim"])].copy())
    references = resolve_references(model, ReferencePolicy("catalog"), ids, features, index.metadata)
    parts = model.encode_queries(
        features, captions, [r.description for r in references], [r.attributes for r in references]
    )
    with torch.no_grad():
        return np.ascontiguousarray(model.query_vectors(parts).float().cpu().numpy())


def exact_top(base: np.ndarray, queries: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Exact top K ids per query by blocked numpy inner products (no second copy of the base)."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), K), dtype=np.int64)
    for start in range(0, len(base), chunk):
        scores = np.concatenate([best_scores, queries @ base[start : start + chunk].T], axis=1)
        ids = np.concatenate([best_ids, np.arange(start, start + scores.shape[1] - K)[None].repeat(len(queries), 0)], 1)
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        best_scores, best_ids = np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_ids, order, 1)
    return best_ids


def closeness(vectors: np.ndarray, mixture: Mixture) -> tuple[float, float]:
    """Mean inner product of 200 real items with their nearest other real item, and of 200 samples
    with their nearest real item: how close the samples sit to real items."""
    real = exact_top(vectors, vectors[:200])[:, 1]
    samples = mixture.sample(200, np.random.default_rng(1))
    nearest = exact_top(vectors, samples)[:, 0]
    return float((vectors[:200] * vectors[real]).sum(1).mean()), float((samples * vectors[nearest]).sum(1).mean())


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / K for f, e in zip(found, exact)]))


def timed(search, queries: np.ndarray) -> tuple[np.ndarray, dict]:
    """Ids found and p50/p95/mean ms per query, one query per call, 1 thread."""
    faiss.omp_set_num_threads(1)
    found = np.full((len(queries), K), -1, dtype=np.int64)
    ms = []
    for row, query in enumerate(queries):
        start = time.perf_counter()
        ids = search(query)
        ms.append((time.perf_counter() - start) * 1000)
        found[row, : len(ids)] = ids[:K]
    return found, {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(np.mean(ms)), 3),
    }


# -- FAISS -------------------------------------------------------------------------------------
def build(
    factory: str, base: np.ndarray, train_cap: int, threads: int, centroids: dict[int, np.ndarray]
) -> tuple[faiss.Index, float, bool]:
    """The index, its build seconds, and whether it reused the IVF centroids an earlier index of the
    same list count trained (``centroids``: nlist -> centroids; FAISS then skips the k-means)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    reused = ivf is not None and ivf.nlist in centroids
    start = time.perf_counter()
    if reused:
        ivf.quantizer.add(centroids[ivf.nlist])
    if not index.is_trained:
        index.train(base[np.random.default_rng(0).permutation(len(base))[:train_cap]])
    index.add(base)
    if ivf is not None:
        centroids[ivf.nlist] = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    return index, time.perf_counter() - start, reused


def mapped_open(path: Path, index: faiss.Index, queries: np.ndarray) -> tuple[float, bool]:
    """RSS MB added by opening ``path`` memory-mapped, and whether it answers as ``index`` does."""
    process = psutil.Process()
    before = process.memory_info().rss
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    added = (process.memory_info().rss - before) / 2**20
    for source in (index, mapped):
        ivf = faiss.try_extract_index_ivf(source)
        if ivf is not None:
            ivf.nprobe = 16
    same = all(np.array_equal(a, b) for a, b in zip(index.search(queries, K), mapped.search(queries, K)))
    return round(added, 1), same


def top_ids(index: faiss.Index):
    return lambda query: index.search(query[None], K)[1][0]


def set_param(index: faiss.Index, name: str, value: int | None) -> None:
    if value is None:
        return
    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value
    else:
        faiss.downcast_index(index).hnsw.efSearch = value


def two_stage_rows(index, base_file: Path, factory: str, nprobe: int, queries, exact, args) -> list[dict]:
    """Candidates from ``index`` at ``nprobe``, re-scored from the memory-mapped float32 rows."""
    from fashion_cir.retrieval.faiss_store import CatalogIndex
    from fashion_cir.retrieval.rescore import RescoreQuery, two_stage_search

    rows = np.load(base_file, mmap_mode="r")
    ids = [str(n) for n in range(len(rows))]
    config = {"feature_dim": args.blocks["image"], "blocks": args.blocks, "nprobe": nprobe, "ef_search": 64}
    store = CatalogIndex(Path(args.tmp), config, ids, {}, {}, rows, index, mapped=True)
    out = []
    for candidates in args.candidates:
        found, times = timed(
            lambda q: [int(h.id) for h in two_stage_search(store, RescoreQuery(q), K, candidates)], queries
        )
        row = {
            "n": len(rows),
            "index": f"two-stage: {factory} nprobe={nprobe} + exact re-score",
            "param": f"candidates={candidates}",
            "recall@10": round(recall(found, exact), 4),
            **times,
        }
        log(row)
        out.append(row)
    return out


def bench_faiss(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, args) -> list[dict]:
    rows = []
    base_file = Path(args.tmp) / "rows.npy"
    np.save(base_file, base)
    centroids: dict[int, np.ndarray] = {}
    for name in args.indexes:
        factory = name.replace("_", ",")
        if name.startswith("HNSW") and len(base) > args.skip_hnsw_at:
            print(f"skip {factory} at n={len(base)} (--skip-hnsw-at {args.skip_hnsw_at})", flush=True)
            continue
        index, seconds, reused = build(factory, base, args.train_cap, args.threads, centroids)
        path = Path(args.tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        mmap_mb, same = mapped_open(path, index, queries[:20])
        sweep: list[tuple[str, int | None]] = [("", None)]
        timed_queries = len(queries)
        if faiss.try_extract_index_ivf(index) is None and not name.startswith("HNSW"):
            timed_queries = min(len(queries), args.scan_queries)  # a full scan per query: fewer of them
        if faiss.try_extract_index_ivf(index) is not None:
            sweep = [("nprobe", p) for p in args.nprobe]
        elif name.startswith("HNSW"):
            sweep = [("efSearch", e) for e in args.ef_search]
        for param, value in sweep:
            set_param(index, param, value)
            found, times = timed(top_ids(index), queries[:timed_queries])
            row = {
                "n": len(base),
                "index": factory,
                "param": f"{param}={value}" if value is not None else None,
                "build_s": round(seconds, 1),
                "centroids_reused": reused,
                "file_mb": round(path.stat().st_size / 2**20, 1),
                "mmap_open_rss_mb": mmap_mb,
                "mmap_same_answers": same,
                "queries": timed_queries,
                "recall@10": round(recall(found, exact[:timed_queries]), 4),
                **times,
                "peak_rss_mb": round(peak_mb()),
            }
            log(row)
            rows.append(row)
        if name in args.two_stage:
            rows += two_stage_rows(index, base_file, factory, args.two_stage_nprobe, queries, exact, args)
        del index
        path.unlink()
    base_file.unlink()
    return rows


# -- the service -------------------------------------------------------------------------------
def bench_service(model, real, mixture: Mixture, args) -> list[dict]:
    """The index's model served over ``--serve`` items (the real ones + samples as raw rows)."""
    from bench_search import free_port, load_test, start_server
    from fashion_cir.retrieval.faiss_store import CatalogIndex, resolve_factory

    folder = Path(args.tmp) / "serve-index"
    extra = max(0, args.serve - len(real))
    ids = [f"sampled-{n:07d}" for n in range(extra)]
    rows = np.concatenate([real.stored_rows(list(real.ids)), mixture.sample(extra, np.random.default_rng(7))])
    real_ids = list(real.ids)
    config = {key: value for key, value in real.config.items() if key not in ("data", "count")}
    config.update(
        factory=resolve_factory(args.serve_factory, len(rows)),
        candidates=args.serve_candidates or None,
        mmap=args.serve_mmap,
        nprobe=args.two_stage_nprobe,
    )
    start = time.perf_counter()
    sample = rows[np.random.default_rng(0).permutation(len(rows))[: args.train_cap]]
    index = CatalogIndex.create(folder, config, sample)
    metadata = {
        **{i: real.metadata[i] for i in real_ids},
        **{i: real.metadata[real_ids[n % 97]] for n, i in enumerate(ids)},
    }
    paths = {**{i: real.paths[i] for i in real_ids}, **{i: real.paths[real_ids[n % 97]] for n, i in enumerate(ids)}}
    index.add_features(real_ids + ids, rows, metadata, paths)
    index.save()
    built = round(time.perf_counter() - start, 1)
    del index, rows
    print(f"service index: {args.serve:,} items, {config['factory']}, built in {built} s", flush=True)
    out = []
    for round_ in range(args.serve_rounds):  # engines alternate, a fresh server each time
        for engine in args.serve_engines if round_ % 2 == 0 else args.serve_engines[::-1]:
            port = free_port()
            server = start_server(folder, str(model.source), port, int8_queries=engine == "int8")
            try:
                server_rss = psutil.Process(server.pid).memory_info().rss / 2**20
                for clients in args.clients:
                    url = f"http://127.0.0.1:{port}"
                    row = asyncio.run(load_test(url, real_ids, [], clients, args.requests, "id"))
                    row.update(
                        items=args.serve,
                        factory=config["factory"],
                        candidates=config["candidates"],
                        mmap=args.serve_mmap,
                        engine=engine,
                        round=round_,
                        server_rss_mb=round(psutil.Process(server.pid).memory_info().rss / 2**20),
                        server_rss_at_start_mb=round(server_rss),
                    )
                    log(row)
                    out.append(row)
            finally:
                server.terminate()
                server.wait(timeout=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "demo" / "index", help="a FAISS index folder")
    parser.add_argument("--n", type=int, default=100_000, help="items (the real ones + samples)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--scan-queries", type=int, default=50, help="queries timed on full-scan indexes (Flat, SQ)")
    parser.add_argument("--components", type=int, default=64)
    parser.add_argument(
        "--indexes", nargs="+", default=["Flat", "IVF1024_Flat", "IVF1024_SQ8", "SQfp16", "SQ8", "HNSW32"]
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--two-stage", nargs="*", default=["IVF1024_SQ8"], help="indexes whose candidates are re-scored"
    )
    parser.add_argument("--two-stage-nprobe", type=int, default=16)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--train-cap", type=int, default=100_000, help="training sample for IVF / SQ")
    parser.add_argument("--threads", type=int, default=2, help="threads for building (searches use 1)")
    parser.add_argument("--skip-hnsw-at", type=int, default=10**9)
    parser.add_argument("--milvus", action="store_true")
    parser.add_argument("--milvus-nlist", type=int, default=1024)
    parser.add_argument("--milvus-nprobe", type=int, nargs="+", default=[16])
    parser.add_argument("--milvus-queries", type=int, default=50)
    parser.add_argument("--serve", type=int, default=0, help="also measure the service on an index of this many items")
    parser.add_argument("--serve-factory", default="auto")
    parser.add_argument("--serve-candidates", type=int, default=0, help="two-stage in the service (0: off)")
    parser.add_argument("--serve-mmap", action="store_true")
    parser.add_argument(
        "--serve-engines", nargs="+", choices=["fp32", "int8"], default=["fp32"], help="the query encoder's weights"
    )
    parser.add_argument("--serve-rounds", type=int, default=1, help="rounds over the engines, alternating their order")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    model, real, real_ids, vectors = real_items(args.index)
    args.blocks = dict(real.config.get("blocks") or {"image": real.config["feature_dim"]})
    mixture = Mixture(vectors, args.blocks, args.components, args.seed)
    base = np.empty((max(args.n, len(vectors)), vectors.shape[1]), dtype=np.float32)
    base[: len(vectors)] = vectors
    mixture.sample(len(base) - len(vectors), rng, out=base[len(vectors) :])
    queries = real_queries(model, real, args.queries, rng)
    exact = exact_top(base, queries)
    real_close, sample_close = closeness(vectors, mixture)
    print(
        f"== {len(base):,} items x {base.shape[1]} ({args.blocks}; {len(vectors)} real + samples of a "
        f"{len(mixture.clusters)}-cluster mixture), {len(queries)} real composed queries of {model.source}, "
        f"{time.perf_counter() - start:.0f} s; mean inner product with the nearest other real item: real items "
        f"{real_close:.3f}, samples {sample_close:.3f}; peak RSS {peak_mb():.0f} MB ==",
        flush=True,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        args.tmp = tmp
        if not args.skip_faiss:
            rows += bench_faiss(base, queries, exact, args)
        if args.milvus:
            from bench_ann import bench_milvus

            rows += bench_milvus(base, queries, exact, args)
        del base
        if args.serve:
            rows += bench_service(model, real, mixture, args)
    print(f"peak RSS {peak_mb():.0f} MB", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
