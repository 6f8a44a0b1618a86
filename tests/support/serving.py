"""Helpers for the index, API and web tests: small catalogs and a real uvicorn server on a free
loopback port. Imported by those test modules (pytest does not load this file by itself)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

CLOTHING = (Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "clothing-dataset").resolve()
COLORS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 190),
    "green": (40, 150, 70),
    "black": (25, 25, 25),
    "yellow": (235, 200, 40),
    "pink": (235, 130, 170),
    "grey": (140, 140, 140),
    "beige": (215, 195, 160),
    "navy": (25, 35, 90),
    "orange": (240, 130, 30),
}
SHAPES = {
    "t-shirt": [
        (20, 20),
        (44, 14),
        (52, 14),
        (76, 20),
        (92, 44),
        (78, 52),
        (72, 44),
        (72, 110),
        (24, 110),
        (24, 44),
        (18, 52),
        (4, 44),
    ],
    "dress": [(36, 12), (60, 12), (64, 40), (86, 116), (10, 116), (32, 40)],
    "pants": [(24, 10), (72, 10), (80, 118), (58, 118), (48, 46), (38, 118), (16, 118)],
    "skirt": [(30, 30), (66, 30), (84, 100), (12, 100)],
    "hat": [(10, 80), (86, 80), (86, 90), (10, 90), (10, 80), (28, 80), (34, 44), (62, 44), (68, 80)],
    "shoes": [(10, 70), (40, 70), (50, 84), (88, 90), (88, 104), (10, 104)],
}


def synthetic_catalog(folder: Path, n: int = 60) -> tuple[dict[str, Path], dict[str, dict]]:
    """``n`` distinct drawings of garments (colour x shape), 96x128 JPEGs, with descriptions."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, metadata = {}, {}
    combos = [(c, s) for s in SHAPES for c in COLORS]
    for number in range(n):
        color, shape = combos[number % len(combos)]
        image = Image.new("RGB", (96, 128), (246, 244, 240 - 3 * (number // len(combos))))
        draw = ImageDraw.Draw(image)
        draw.polygon(SHAPES[shape], fill=COLORS[color])
        if number // len(combos):
            draw.line([(0, 0), (95, 127)], fill=(200, 200, 200), width=number // len(combos))
        image_id = f"item-{number:03d}"
        paths[image_id] = folder / f"{image_id}.jpg"
        image.save(paths[image_id], "JPEG", quality=92)
        metadata[image_id] = {"category": shape, "color": color, "description": f"a {color} {shape}"}
    return paths, metadata


def demo_catalog(folder: Path, n: int = 60) -> tuple[dict[str, Path], dict[str, dict]]:
    """The first ``n`` clothing-dataset photos with their MLLM attributes when the shared dataset is
    present (paths point into it, read-only), else a synthetic catalog written to ``folder``."""
    if not (CLOTHING / "attributes.jsonl").is_file():
        return synthetic_catalog(folder, n)
    paths = {p.stem: p for p in sorted((CLOTHING / "images").glob("*.jpg"))[:n]}
    metadata = {}
    with (CLOTHING / "attributes.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["image"] in paths:
                metadata[record.pop("image")] = record
    return paths, metadata


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1 (a free port); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # generous: a busy machine, two test workers
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start" + ("" if thread.is_alive() else " (its thread ended)"))
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def model_with_heads(folder: Path, catalog: tuple[dict[str, Path], dict[str, dict]], cache: Path):
    """The tiny model with attribute heads trained on ``catalog``'s labels (first 3/4 train, rest
    val), saved as a model folder and loaded back from it."""
    from fashion_cir.features.cache import FeatureCache
    from fashion_cir.models.attributes import HeadsConfig, train_heads
    from fashion_cir.models.cir import load_model

    paths, metadata = catalog
    model = load_model(backbone="tiny")
    ids, features = FeatureCache(cache).encode(model.backbone, paths, progress=False)
    cut = len(ids) * 3 // 4
    model.attach_heads(
        train_heads(
            features[:cut],
            [metadata[i] for i in ids[:cut]],
            features[cut:],
            [metadata[i] for i in ids[cut:]],
            config=HeadsConfig(steps=50),
        )
    )
    model.save(folder)
    return load_model(folder)


def indexed_demo_catalog(root: Path, n: int = 60):
    """(catalog, model with heads, index folder): :func:`demo_catalog` indexed by :func:`model_with_heads`."""
    from fashion_cir.retrieval import build_index

    catalog = demo_catalog(root / "catalog", n)
    model = model_with_heads(root / "model", catalog, root / "cache")
    build_index(root / "index", model, *catalog, progress=False)
    return catalog, model, root / "index"
