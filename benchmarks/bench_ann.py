"""ANN benchmark on realistic embeddings: a Gaussian mixture fitted to real catalog features.

1. Real features: every clothing-catalog image encoded by the offline demo backbone (256-d,
   L2-normalised; ``--backbone``), through the feature cache (``runs/bench-ann/``).
2. The mixture: k-means (FAISS, ``--components``) over the real features; each cluster is a
   Gaussian with its mean and a shrunk full covariance (0.9 S + 0.1 tr(S)/d I), weighted by its
   size. ``--n`` vectors and ``--queries`` held-out queries are sampled and L2-normalised (real
   features are included in the base).
3. Per index: build seconds, serialized size (memory), ms/query for one query at a time
   (what the service does) at 1 and ``--threads`` threads, batched ms/query, recall@10 against
   exact search, and the recall/latency curve over nprobe / efSearch. Milvus-lite (embedded
   Milvus, pure-Python engine) is measured with ``--milvus``.

    nice -n 10 python benchmarks/bench_ann.py --n 100000 --milvus
    nice -n 10 python benchmarks/bench_ann.py --n 1000000 --indexes Flat,IVF1024,IVF1024_SQ8 --skip-hnsw-at 500000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATALOG = (REPO / ".." / "shared" / "datasets" / "clothing-dataset").resolve()
K = 10


def cached_features(backbone, folders: list[Path]) -> np.ndarray:
    """The catalog features already in feature-cache folders (``ROOT/<trunk fingerprint>``, read
    only): their image-trunk rows, one per image id, through the backbone's head."""
    import torch

    trunks: dict[str, np.ndarray] = {}
    for folder in folders:
        for part in sorted(Path(folder).glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as data:
                    trunks.update({str(i): f for i, f in zip(data["ids"], data["features"])})
            except (OSError, ValueError, KeyError):
                continue  # a part being written by its owner right now
    trunk = torch.from_numpy(np.stack(list(trunks.values())).astype(np.float32))
    with torch.no_grad():
        return backbone.image_head(trunk).numpy()


def real_features(args: argparse.Namespace) -> np.ndarray:
    """Offline-backbone features of the catalog images, L2-normalised (cached in ``runs/bench-ann``)."""
    out = REPO / "runs" / "bench-ann" / "catalog-features.npy"
    if out.is_file():
        return np.load(out)
    from fashion_cir.data.images import scan_images
    from fashion_cir.features.cache import FeatureCache
    from fashion_cir.models.factory import create_backbone

    backbone = create_backbone(args.backbone)
    if args.cached_only:
        fingerprint = backbone.trunk_fingerprint()
        folders = [REPO / "runs" / "bench-ann" / "cache" / fingerprint] + [
            Path(c) / fingerprint for c in args.trunk_cache
        ]
        features = cached_features(backbone, folders)
        print(f"{len(features)} catalog images already encoded in {len(folders)} caches (--cached-only)")
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
        return features.astype(np.float32)
    paths = scan_images(CATALOG / "images")
    start = time.perf_counter()
    ids, features = FeatureCache(REPO / "runs" / "bench-ann" / "cache").encode(
        backbone, paths, batch_size=64, on_error="skip", progress=True
    )
    print(f"encoded {len(ids)} of {len(paths)} catalog images in {time.perf_counter() - start:.0f} s")
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features.astype(np.float32))
    return features.astype(np.float32)


def fit_mixture(real: np.ndarray, components: int, seed: int):
    kmeans = faiss.Kmeans(real.shape[1], components, niter=25, seed=seed, spherical=True)
    kmeans.train(real)
    _, labels = kmeans.index.search(real, 1)
    labels = labels[:, 0]
    weights, means, factors = [], [], []
    d = real.shape[1]
    for c in range(components):
        members = real[labels == c]
        if len(members) < 2:
            continue
        cov = np.cov(members, rowvar=False)
        cov = 0.9 * cov + 0.1 * np.trace(cov) / d * np.eye(d)
        weights.append(len(members))
        means.append(members.mean(0))
        factors.append(np.linalg.cholesky(cov + 1e-9 * np.eye(d)))
    weights = np.asarray(weights, dtype=np.float64)
    return weights / weights.sum(), np.stack(means), np.stack(factors)


def sample(mixture, n: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    weights, means, factors = mixture
    out = np.empty((n, means.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        comp = rng.choice(len(weights), size=size, p=weights)
        block = np.empty((size, means.shape[1]))
        for c in np.unique(comp):
            rows = np.flatnonzero(comp == c)
            block[rows] = means[c] + rng.standard_normal((len(rows), means.shape[1])) @ factors[c].T
        out[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / K for f, e in zip(found, exact)]))


def time_single(index, queries: np.ndarray, threads: int, params=None) -> tuple[float, np.ndarray]:
    """ms/query, one query per call (the service's pattern); returns (ms, ids)."""
    faiss.omp_set_num_threads(threads)
    found = np.empty((len(queries), K), dtype=np.int64)
    start = time.perf_counter()
    for row, query in enumerate(queries):
        found[row] = index.search(query[None], K, params=params)[1][0]
    return (time.perf_counter() - start) * 1000 / len(queries), found


def time_batch(index, queries: np.ndarray, threads: int, params=None) -> float:
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index.search(queries, K, params=params)
    return (time.perf_counter() - start) * 1000 / len(queries)


def build(factory: str, base: np.ndarray, train_cap: int) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if ",PQ" in factory:  # polysemous code training takes minutes and is not used by IP search
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    start = time.perf_counter()
    if not index.is_trained:
        index.train(base[np.random.default_rng(0).permutation(len(base))[:train_cap]])
    index.add(base)
    return index, time.perf_counter() - start


def bench_faiss(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, args: argparse.Namespace) -> list[dict]:
    rows = []
    n = len(base)
    for name in args.indexes.split(","):
        if name.startswith("HNSW") and n > args.skip_hnsw_at:
            print(f"skip {name} at n={n} (build too long on this machine; --skip-hnsw-at)")
            continue
        factory = name.replace("_", ",")  # IVF1024_SQ8 -> IVF1024,SQ8
        if name.startswith("IVF") and "," not in factory:
            factory += ",Flat"
        index, seconds = build(factory, base, train_cap=args.train_cap)
        size = faiss.serialize_index(index).nbytes
        sweep = [None]
        if "IVF" in name:
            sweep = [p for p in args.nprobe if p <= faiss.extract_index_ivf(index).nlist]
        elif name.startswith("HNSW"):
            sweep = args.ef_search
        for value in sweep:
            params = None
            if "IVF" in name:
                params = faiss.SearchParametersIVF(nprobe=value)
            elif name.startswith("HNSW"):
                params = faiss.SearchParametersHNSW(efSearch=value)
            single = queries[: args.single_queries]
            ms1, found = time_single(index, single, 1, params)
            ms8, _ = time_single(index, single, args.threads, params)
            batch1 = time_batch(index, queries, 1, params)
            batch8 = time_batch(index, queries, args.threads, params)
            _, all_found = index.search(queries, K, params=params)
            row = {
                "n": n,
                "index": factory,
                "param": None if value is None else (f"nprobe={value}" if "IVF" in name else f"efSearch={value}"),
                "build_s": round(seconds, 2),
                "size_mb": round(size / 2**20, 1),
                "ms_q_1t": round(ms1, 3),
                f"ms_q_{args.threads}t": round(ms8, 3),
                "batch_ms_q_1t": round(batch1, 4),
                f"batch_ms_q_{args.threads}t": round(batch8, 4),
                "recall@10": round(recall(all_found, exact), 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del index
    return rows


def bench_milvus(base: np.ndarray, queries: np.ndarray, exact: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """milvus-lite (embedded, local file) through pymilvus: insert, index, search."""
    from pymilvus import DataType, MilvusClient

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "bench.db"))
        for index_type, params, sweep in [
            ("FLAT", {}, [None]),
            ("IVF_FLAT", {"nlist": args.milvus_nlist}, args.milvus_nprobe),
        ]:
            name = f"bench_{index_type.lower()}"
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=base.shape[1])
            index_params = client.prepare_index_params()
            index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
            start = time.perf_counter()
            client.create_collection(name, schema=schema)
            for chunk in range(0, len(base), 5000):
                block = base[chunk : chunk + 5000]
                client.insert(name, [{"id": chunk + i, "vector": v} for i, v in enumerate(block.tolist())])
            client.flush(name)  # as the store's save does: unflushed (growing) segments are searched ~25x slower
            client.create_index(name, index_params)
            client.load_collection(name)
            seconds = time.perf_counter() - start
            for value in sweep:
                search_params = {"metric_type": "IP", "params": {} if value is None else {"nprobe": value}}
                single = queries[: args.milvus_queries]
                found = np.empty((len(single), K), dtype=np.int64)
                start = time.perf_counter()
                for row, query in enumerate(single):
                    hits = client.search(name, data=[query.tolist()], limit=K, search_params=search_params)[0]
                    found[row, : len(hits)] = [h["id"] for h in hits]
                ms = (time.perf_counter() - start) * 1000 / len(single)
                row = {
                    "n": len(base),
                    "index": f"milvus-lite {index_type}" + (f" nlist={params['nlist']}" if params else ""),
                    "param": None if value is None else f"nprobe={value}",
                    "build_s": round(seconds, 2),
                    "ms_q_1t": round(ms, 3),
                    "recall@10": round(recall(found, exact[: len(single)]), 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            client.drop_collection(name)
        client.close()
    return rows


def bench_service(mixture, args: argparse.Namespace) -> list[dict]:
    """p50/p95 of ``POST /search`` by catalog id (query composition included: text embedding +
    compose + search) with ``--clients`` concurrent clients, on an index of ``--serve`` items:
    200 real catalog images (encoded, from the cache) plus sampled vectors standing for more items."""
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_search import free_port, load_test, start_server
    from fashion_cir.data.images import scan_images
    from fashion_cir.models.cir import load_model
    from fashion_cir.retrieval import build_index

    model = load_model(backbone=args.backbone)
    paths = dict(list(scan_images(CATALOG / "images").items())[:200])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ann-serve-") as tmp:
        folder = Path(tmp) / "index"
        index = build_index(
            folder,
            model,
            paths,
            CATALOG / "attributes.jsonl",
            factory="Flat",
            cache_dir=REPO / "runs" / "bench-ann" / "cache",
            progress=False,
        )
        real_ids = list(index.ids)
        extra = args.serve - len(real_ids)
        ids = [f"sampled-{n:07d}" for n in range(extra)]
        vectors = sample(mixture, extra, np.random.default_rng(1))
        image_of = {i: index.paths[real_ids[n % len(real_ids)]] for n, i in enumerate(ids)}
        meta = {i: index.metadata[real_ids[n % len(real_ids)]] for n, i in enumerate(ids)}
        index.add_features(ids, vectors, meta, image_of)
        index.save()
        print(f"service index: {len(index):,} items (Flat), {len(real_ids)} real", flush=True)
        port = free_port()
        server = start_server(folder, args.backbone, port)
        try:
            for clients in args.clients:
                row = asyncio.run(
                    load_test(f"http://127.0.0.1:{port}", real_ids + ids[:5000], [], clients, args.requests, "id")
                )
                row["items"] = len(index)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="base vectors (sampled + the real ones)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--components", type=int, default=64)
    parser.add_argument(
        "--backbone", default=None, help="default: offline:runs/bench-ann/offline-backbone if present, else offline"
    )
    parser.add_argument("--indexes", default="Flat,IVF1024,IVF1024_SQ8,IVF1024_PQ64,HNSW32")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--train-cap", type=int, default=100_000, help="training sample for IVF/PQ")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--skip-hnsw-at", type=int, default=10**9)
    parser.add_argument(
        "--cached-only", action="store_true", help="use only catalog images already in feature caches (no encoding)"
    )
    parser.add_argument("--trunk-cache", nargs="*", default=[], help="more feature-cache roots to read (read only)")
    parser.add_argument("--milvus", action="store_true")
    parser.add_argument("--milvus-nlist", type=int, default=256)
    parser.add_argument("--milvus-nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--milvus-queries", type=int, default=50)
    parser.add_argument("--serve", type=int, default=0, help="also measure the service on an index of this many items")
    parser.add_argument("--clients", type=int, nargs="+", default=[4])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--skip-ann", action="store_true", help="no FAISS measurements (milvus-lite / service only)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.backbone is None:
        aligned = REPO / "runs" / "bench-ann" / "offline-backbone"
        args.backbone = f"offline:{aligned}" if (aligned / "projection.pt").is_file() else "offline"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real = real_features(args)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    mixture = fit_mixture(real, args.components, args.seed)
    base = np.concatenate([real, sample(mixture, max(0, args.n - len(real)), rng)])
    queries = sample(mixture, args.queries, rng)
    print(
        f"== {args.n:,} vectors ({len(real)} real + sampled from a {len(mixture[0])}-component mixture, "
        f"{time.perf_counter() - start:.0f} s), {args.queries} queries, {faiss.omp_get_max_threads()} cores, "
        f"backbone {args.backbone} ==",
        flush=True,
    )
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    exact = flat.search(queries, K)[1]
    # the nearest real neighbours' similarity, real vs sampled: how close the mixture is to real data
    real_index = faiss.IndexFlatIP(real.shape[1])
    real_index.add(real)
    real_sims = real_index.search(real[:500], 2)[0][:, 1].mean()
    sample_sims = real_index.search(queries[:500], 1)[0][:, 0].mean()
    print(
        f"mean top-1 cosine to the real catalog: real items (excluding self) {real_sims:.3f}, samples {sample_sims:.3f}"
    )
    del flat
    rows = [] if args.skip_ann else bench_faiss(base, queries, exact, args)
    if args.milvus:
        rows += bench_milvus(base, queries, exact, args)
    if args.serve:
        rows += bench_service(mixture, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
