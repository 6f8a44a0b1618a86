"""Search benchmarks.

1. Serving: latency p50/p95 and throughput of ``POST /search`` with N concurrent clients on
   loopback, against a real uvicorn server (a subprocess) over a demo-like catalog index.
2. FAISS Flat / IVF / HNSW versus brute-force numpy on ``--n`` random unit vectors of ``--dim``
   dimensions: build time, query time, and recall@10 of the approximate indexes against exact.

    python benchmarks/bench_search.py                                  # tiny model, 500 clothing images, 1M vectors
    python benchmarks/bench_search.py --n 100000 --clients 1,8 --skip-serving
    python benchmarks/bench_search.py --model runs/stage2 --images 2000 --skip-faiss
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = (REPO / ".." / "shared" / "datasets" / "clothing-dataset").resolve()
CAPTIONS = [
    "is red with long sleeves",
    "is darker and shorter",
    "has a floral print",
    "is a denim version",
    "is black and sleeveless",
    "has a hood and a zip",
    "is white with a collar",
    "is more casual",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- 1. serving ------------------------------------------------------------------------------------
def build_demo_index(folder: Path, args: argparse.Namespace) -> list[str]:
    from fashion_cir.models.cir import load_model
    from fashion_cir.retrieval import build_index

    model = load_model(model_dir=args.model, backbone=None if args.model else args.backbone)
    catalog = Path(args.catalog)
    paths = sorted((catalog / "images").glob("*.jpg"))[: args.images]
    metadata = [catalog / name for name in ("images.csv", "attributes.jsonl") if (catalog / name).is_file()]
    start = time.perf_counter()
    index = build_index(
        folder,
        model,
        {p.stem: p for p in paths},
        metadata,
        factory=args.factory,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        progress=False,
    )
    print(
        f"index: {len(index)} images, {args.factory}, built in {time.perf_counter() - start:.1f} s "
        f"({index.report['computed']} encoded, {index.report['reused']} from cache)"
    )
    return index.ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, model: str, port: int, **options) -> subprocess.Popen:
    """``serve`` in a process of its own; ``options`` (JSON values) go to the app."""
    code = (
        "import json, sys; from fashion_cir.serving.app import serve; "
        "serve(sys.argv[1], sys.argv[2], port=int(sys.argv[3]), **json.loads(sys.argv[4]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), model, str(port), json.dumps(options)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("server did not start within 120 s")


async def load_test(url: str, ids: list[str], uploads: list[bytes], clients: int, requests: int, mode: str) -> dict:
    import httpx

    rng = random.Random(0)
    latencies: list[float] = []
    failures = 0

    async def worker(client: httpx.AsyncClient, count: int) -> None:
        nonlocal failures
        for _ in range(count):
            data = {"text": rng.choice(CAPTIONS), "k": "10"}
            files = None
            if mode == "id":
                data["id"] = rng.choice(ids)
            else:
                files = {"image": ("ref.jpg", rng.choice(uploads), "image/jpeg")}
            start = time.perf_counter()
            response = await client.post("/search", data=data, files=files)
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await client.post("/search", data={"text": CAPTIONS[0], "id": ids[0]})  # warm-up
        start = time.perf_counter()
        share = [requests // clients + (i < requests % clients) for i in range(clients)]
        await asyncio.gather(*(worker(client, n) for n in share))
        wall = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "mode": mode,
        "clients": clients,
        "requests": requests,
        "failures": failures,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "throughput_rps": requests / wall,
    }


def bench_serving(args: argparse.Namespace) -> list[dict]:
    print(f"\n== serving: POST /search on loopback ({args.model or args.backbone}) ==")
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        folder = Path(tmp) / "index"
        ids = build_demo_index(folder, args)
        uploads = [(Path(args.catalog) / "images" / f"{i}.jpg").read_bytes() for i in ids[:20]]
        port = free_port()
        server = start_server(folder, args.model or args.backbone, port)
        rows = []
        try:
            for mode in ("id", "upload"):
                for clients in args.clients:
                    row = asyncio.run(load_test(f"http://127.0.0.1:{port}", ids, uploads, clients, args.requests, mode))
                    rows.append(row)
                    print(
                        f"{mode:>6} ref, {clients:>3} clients: p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                        f"{row['throughput_rps']:7.1f} req/s  ({row['failures']} failed of {row['requests']})"
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return rows


# -- 2. FAISS versus numpy -----------------------------------------------------------------------------
def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        rows[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return rows


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def bench_faiss(args: argparse.Namespace) -> list[dict]:
    import faiss

    print(
        f"\n== FAISS vs numpy: {args.n:,} random unit vectors, d={args.dim}, {args.queries} queries, k=10, "
        f"{faiss.omp_get_max_threads()} threads =="
    )
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    base = unit_vectors(rng, args.n, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    print(f"data: {base.nbytes / 2**30:.2f} GiB generated in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    exact = numpy_topk(base, queries, 10)
    numpy_s = time.perf_counter() - start
    rows = [
        {"method": "numpy brute force", "build_s": 0.0, "query_ms": numpy_s / args.queries * 1000, "recall@10": 1.0}
    ]
    print(f"{'method':<34}{'build s':>10}{'ms/query':>11}{'queries/s':>12}{'vs numpy':>10}{'recall@10':>11}")
    show(rows[0], rows[0])

    nlist = args.nlist or max(1, int(round(args.n**0.5)))
    configs = [
        ("Flat", "Flat", {}),
        (f"IVF{nlist},Flat", f"IVF{nlist},Flat", {"nprobe": args.nprobe}),
        (f"HNSW{args.hnsw_m}", f"HNSW{args.hnsw_m}", {"efSearch": args.ef_search}),
    ]
    for name, factory, params in configs:
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        if not index.is_trained:
            sample = base[rng.choice(args.n, size=min(args.n, 256 * nlist), replace=False)]
            index.train(sample)
        index.add(base)
        build_s = time.perf_counter() - start
        for key, value in params.items():
            faiss.ParameterSpace().set_index_parameter(index, key, value)
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        query_s = time.perf_counter() - start
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        rows.append(
            {
                "method": f"faiss {label}",
                "build_s": build_s,
                "query_ms": query_s / args.queries * 1000,
                "recall@10": recall(found, exact),
            }
        )
        show(rows[-1], rows[0])
        del index
    return rows


def show(row: dict, baseline: dict) -> None:
    row["speedup_vs_numpy"] = baseline["query_ms"] / row["query_ms"]
    print(
        f"{row['method']:<34}{row['build_s']:>10.1f}{row['query_ms']:>11.3f}{1000 / row['query_ms']:>12.0f}"
        f"{row['speedup_vs_numpy']:>9.1f}x{row['recall@10']:>11.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="trained model folder (default: zero-shot --backbone)")
    parser.add_argument("--backbone", default="tiny", help="backbone spec when no --model (default: tiny)")
    parser.add_argument(
        "--catalog", default=str(DEFAULT_CATALOG), help="catalog folder with images/ (+ attributes.jsonl)"
    )
    parser.add_argument("--images", type=int, default=500, help="catalog images to index (default 500)")
    parser.add_argument("--factory", default="Flat", help="FAISS factory string of the served index")
    parser.add_argument("--cache-dir", help="feature cache folder to reuse between runs")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=200, help="requests per (mode, clients) run")
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors for the FAISS benchmark")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, help="IVF lists (default: sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    results = {}
    if not args.skip_serving:
        results["serving"] = bench_serving(args)
    if not args.skip_faiss:
        results["faiss"] = bench_faiss(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
