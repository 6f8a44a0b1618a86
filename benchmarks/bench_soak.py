"""Soak + faults: ``--clients`` concurrent clients against a locally started ``fashion-cir serve``
(127.0.0.1 only) over a real FAISS index, for ``--duration`` seconds: catalog-id searches, uploads
up to the limits (catalog photos, a JPEG near the byte limit, a PNG just under the pixel limit, a
JPEG far above the pixel limit that decodes at reduced scale, a 100000x1 PNG and a PNG whose header
claims 20000x20000, both refused from the header), browsing (item lists, items, images) and the
issue-22 probes (injected ids, crashing filters, same_type with a category, a repeated field: each
must be a 4xx). Meanwhile the index changes live (``--live-every``: 5 items removed and added back
through the library, as ``index remove``/``index add`` do) and, every ``--fault-every`` seconds, a
broken index.json (malformed, then nested 100,000 deep) is swapped in under the writers' lock for
a moment and the good one put back (the service must report ``degraded``, keep answering from the
last good index, and recover). Reports p50/p95/p99 per kind, statuses, 5xx, the server's peak RSS,
the load average and what each fault did.

    nice -n 10 .venv/bin/python benchmarks/bench_soak.py --duration 300 --clients 16
    (first run: builds runs/bench-soak/index from the clothing catalog with --backbone tiny, or
     pass --index DIR [--model DIR] for an existing index; the live changes write to it)

Targets (issues 12, 22): zero 5xx, peak RSS < 2.5 GB, p95 of id searches < 150 ms on the 2-core
machine, every probe and refused upload a 4xx, every fault seen as degraded and recovered."""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the live writer and the faults use the library in-process
CATALOG = (REPO / ".." / "shared" / "datasets" / "clothing-dataset").resolve()
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = [
    "is red with long sleeves",
    "is darker and shorter",
    "has a floral pattern",
    "is blue",
    "is more casual",
    "has a v-neck and no sleeves",
    "is black leather",
    "is white and looser",
    "has stripes",
    "is a dress instead",
]
MIX = {"id search": 0.5, "upload": 0.15, "items": 0.1, "item": 0.1, "image": 0.1, "probe": 0.05}
DEEP = "(" * 330 + 'color == "red"' + ")" * 330
PROBES = {  # issue 22: each must be answered with a 4xx (never a 5xx, never another item)
    "id injection": ("get", "/items/x'%5D%20or%20id%20not%20in%20%5B'", None),
    "image injection": ("get", "/images/x'%5D%20or%20id%20not%20in%20%5B'", None),
    "id x'": ("get", "/items/x'", None),
    "id x\\": ("get", "/items/x%5C", None),
    "filter 042": ("post", "/search", {"text": "is red", "filter": "color == 042"}),
    "filter 330 parentheses": ("post", "/search", {"text": "is red", "filter": DEEP}),
    "filter 250 not": ("post", "/search", {"text": "is red", "filter": "not " * 250 + 'color == "red"'}),
    "filter control character": ("post", "/search", {"text": "is red", "filter": 'color == "re\bd"'}),
    "same_type + category": ("post", "/search", {"text": "is red", "same_type": "true", "category": "dress"}),
    "repeated id": ("post", "/search", {"text": "is red", "id": ["ID", "ID"]}),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def uploads(max_pixels: int, max_bytes: int) -> list[tuple[str, bytes, str]]:
    """Catalog photos plus payloads at the limits."""
    rng = np.random.default_rng(0)
    photos = sorted((CATALOG / "images").glob("*.jpg"))[:6]
    out = [(p.name, p.read_bytes(), "image/jpeg") for p in photos]
    side = int(max_pixels**0.5) - 1  # a PNG just under the pixel limit (decoded in full)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(png, "PNG", compress_level=1)
    if len(png.getvalue()) <= max_bytes:
        out.append((f"limit-{side}x{side}.png", png.getvalue(), "image/png"))
    big = io.BytesIO()  # far above the pixel limit, but a JPEG: decoded at 1/8 scale
    Image.fromarray(np.kron(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))).save(
        big, "JPEG", quality=90
    )
    out.append(("large-4000x4000.jpg", big.getvalue(), "image/jpeg"))
    quality, noisy = 95, b""  # a JPEG close to the byte limit
    noise = Image.fromarray(rng.integers(0, 255, (1800, 1800, 3), dtype=np.uint8))
    while quality > 20:
        buffer = io.BytesIO()
        noise.save(buffer, "JPEG", quality=quality)
        if len(buffer.getvalue()) <= max_bytes:
            noisy = buffer.getvalue()
            break
        quality -= 10
    if noisy:
        out.append((f"noise-{len(noisy) >> 20}MB.jpg", noisy, "image/jpeg"))
    thin = io.BytesIO()  # issue 22 item 1: inside the pixel limit, a 6.4M x 64 resize without the aspect check
    Image.new("RGB", (100_000, 1), (200, 30, 30)).save(thin, "PNG")
    out.append(("thin-100000x1.png", thin.getvalue(), "image/png"))
    out.append(("huge-20000x20000.png", png_claiming(20_000, 20_000), "image/png"))
    return out


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def probe(http: httpx.Client, rng: random.Random, ids: list[str]) -> tuple[str, httpx.Response]:
    name = rng.choice(sorted(PROBES))
    method, path, form = PROBES[name]
    if method == "get":
        return name, http.get(path)
    form = {k: ([rng.choice(ids)] * 2 if v == ["ID", "ID"] else v) for k, v in form.items()}
    form.setdefault("id", rng.choice(ids))
    return name, http.post(path, data=form)


def client(base: str, ids: list[str], payloads, deadline: float, seed: int, log: list) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX.items())
    with httpx.Client(base_url=base, timeout=60) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                if kind == "id search":
                    response = http.post("/search", data={"id": rng.choice(ids), "text": rng.choice(TEXTS), "k": "12"})
                elif kind == "upload":
                    name, data, mime = rng.choice(payloads)
                    response = http.post(
                        "/search", data={"text": rng.choice(TEXTS)}, files={"image": (name, data, mime)}
                    )
                    special = name.startswith(("limit-", "large-", "noise-", "thin-", "huge-"))
                    kind = f"upload {name.split('-')[0] if special else 'photo'}"
                elif kind == "probe":
                    name, response = probe(http, rng, ids)
                    kind = f"probe: {name}"
                elif kind == "items":
                    response = http.get("/items", params={"n": 24, "seed": rng.randrange(10**6)})
                elif kind == "item":
                    response = http.get(f"/items/{rng.choice(ids)}")
                else:
                    response = http.get(f"/images/{rng.choice(ids)}")
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            log.append((kind, status, (time.perf_counter() - start) * 1000))


def live_writer(folder: Path, keep: str, deadline: float, every: float, log: list) -> None:
    """Every ``every`` seconds remove 5 random items (never ``keep``) and add them back (their cached
    features are reused), through the library, under the index folder's writer lock, as the CLI does."""
    from fashion_cir.retrieval import add_to_index, open_index, remove_from_index
    from fashion_cir.retrieval.folder import index_model

    model = index_model(folder)
    index = open_index(folder)
    paths, metadata = dict(index.paths), {i: index.metadata.get(i, {}) for i in index.ids}
    rng = random.Random(7)
    while time.monotonic() + every < deadline:
        time.sleep(every)
        chosen = rng.sample(sorted(set(paths) - {keep}), 5)
        start = time.perf_counter()
        try:
            remove_from_index(folder, chosen)
            add_to_index(folder, model, {i: paths[i] for i in chosen}, {i: metadata[i] for i in chosen}, progress=False)
            outcome = "ok"
        except Exception as exc:  # reported, not raised: the soak goes on
            outcome = f"{type(exc).__name__}: {exc}"[:200]
        log.append(("live remove+add 5", outcome, (time.perf_counter() - start) * 1000))


def manifest_faults(folder: Path, base: str, ids: list[str], deadline: float, every: float, log: list) -> None:
    """Every ``every`` seconds swap a broken index.json in (under the writers' lock, so the live
    writer waits), check that the service says degraded and still searches, put the good one back
    and check that it recovers."""
    from fashion_cir.io import folder_lock

    broken = ["{ not json", "[" * 100_000 + "]" * 100_000]
    with httpx.Client(base_url=base, timeout=60) as http:
        for number in itertools.count():
            if time.monotonic() + every >= deadline:
                return
            time.sleep(every)
            start = time.perf_counter()
            with folder_lock(folder):
                good = (folder / "index.json").read_bytes()
                swap(folder, broken[number % 2].encode())
                status = http.get("/health").json()["status"]
                search = http.post("/search", data={"id": ids[0], "text": "is red"}).status_code
                swap(folder, good)
            recovered = http.get("/health").json()["status"]
            name = ["malformed", "nested 100,000 deep"][number % 2]
            log.append(
                (
                    f"fault: {name} index.json",
                    f"health {status}, search {search}, then {recovered}",
                    (time.perf_counter() - start) * 1000,
                )
            )


def swap(folder: Path, data: bytes) -> None:
    (folder / "index.json.fault").write_bytes(data)
    os.replace(folder / "index.json.fault", folder / "index.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "bench-soak" / "index")
    parser.add_argument("--model", type=Path, default=None, help="model folder to serve (default: the index's)")
    parser.add_argument("--backbone", default="tiny", help="backbone for building a missing index")
    parser.add_argument("--images", type=Path, default=CATALOG / "images", help="catalog for building a missing index")
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--live-every", type=float, default=5, help="seconds between live remove+add (0: none)")
    parser.add_argument("--fault-every", type=float, default=60, help="seconds between broken manifests (0: none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "fashion_cir.cli"]
    if not (args.index / "index.json").exists():
        start = time.perf_counter()
        subprocess.run(
            cli + ["index", "build", str(args.index), "--images", str(args.images), "--backbone", args.backbone],
            env=ENV,
            cwd=REPO,
            check=True,
        )
        print(f"built {args.index} in {time.perf_counter() - start:.0f} s", flush=True)
    port = free_port()
    serve = cli + ["serve", "--index", str(args.index), "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        serve += ["--model", str(args.model)]
    server = subprocess.Popen(serve, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(2400):  # importing torch on a loaded machine can take minutes
            try:
                health = httpx.get(base + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise RuntimeError(server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        rss_start = rss_kb(server.pid)
        ids = [i["id"] for i in httpx.get(base + "/items", params={"n": 200, "seed": 1}).json()["items"]]
        limits = health["limits"]
        payloads = uploads(limits["max_pixels"], limits["max_upload_bytes"])
        print(
            f"serving {health['items']} items ({health['backbone']}), limits {limits}; uploads: "
            f"{[(n, len(d)) for n, d, _ in payloads]}; {args.clients} clients for {args.duration:.0f} s",
            flush=True,
        )
        log: list = []
        deadline = time.monotonic() + args.duration
        threads = [
            threading.Thread(target=client, args=(base, ids, payloads, deadline, seed, log))
            for seed in range(args.clients)
        ]
        if args.live_every:
            threads.append(
                threading.Thread(target=live_writer, args=(args.index, ids[0], deadline, args.live_every, log))
            )
        if args.fault_every:
            threads.append(
                threading.Thread(target=manifest_faults, args=(args.index, base, ids, deadline, args.fault_every, log))
            )
        samples = []
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            samples.append(rss_kb(server.pid))
            time.sleep(0.5)
        peak_kb = max(rss_kb(server.pid, "VmHWM"), max(samples, default=0))
        load = os.getloadavg()
    finally:
        server.terminate()
        server.wait(20)
    by_kind = collections.defaultdict(list)
    statuses = collections.defaultdict(collections.Counter)
    for kind, status, ms in log:
        by_kind[kind].append(ms)
        statuses[kind][status] += 1
    refused = [
        (s, n)
        for kind, c in statuses.items()
        if kind.startswith(("probe:", "upload thin", "upload huge"))
        for s, n in c.items()
    ]
    report = {
        "requests": len(log),
        "seconds": args.duration,
        "requests_per_second": round(len(log) / args.duration, 1),
        "server_5xx": sum(n for c in statuses.values() for s, n in c.items() if isinstance(s, int) and s >= 500),
        "client_errors": sum(
            n
            for kind, c in statuses.items()
            if not kind.startswith(("fault:", "live "))
            for s, n in c.items()
            if not isinstance(s, int)
        ),
        "probes_not_4xx": sum(n for s, n in refused if not (isinstance(s, int) and 400 <= s < 500)),
        "rss_start_mb": round(rss_start / 1024),
        "peak_rss_mb": round(peak_kb / 1024),
        "load_average_1_5_15": [round(x, 1) for x in load],
        "cpus": os.cpu_count(),
        "kinds": {},
    }
    for kind in sorted(by_kind):
        values = np.array(by_kind[kind])
        report["kinds"][kind] = {
            "n": len(values),
            **{f"p{q}_ms": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)},
            "statuses": dict(statuses[kind]),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
