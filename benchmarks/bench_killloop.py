"""kill -9 at random points of ``index build``, ``index add``, feature caching and training, then
re-run: every cycle must end in a complete, consistent result with nothing lost or duplicated.

    nice -n 10 .venv/bin/python benchmarks/bench_killloop.py --kills 20 --images 96

Real commands in subprocesses on real catalog photos (the first ``--images`` clothing images,
tiny model). Per operation: one uninterrupted run gives the reference and its duration T; then
each cycle starts the operation, SIGKILLs it at a random moment in [import time, T], records what
the kill left (the state), checks that whatever is on disk is still valid (an index manifest that
exists must load), re-runs the same command to completion and compares with the reference:
  build  same ids (no duplicates), features equal the reference's, one data folder, no leftovers;
         every other cycle starts from a complete index that the build overwrites
  add    base index + new ids: all present once, features equal, old index loadable after any kill
  cache  FeatureCache (flush every 8 images): every id once across the shards, features equal
  train  stage 1 (tiny, checkpoint every step): final weights bit-identical to the reference,
         each step's loss logged exactly once
Prints one line per cycle and a summary (kills per op, states seen, failures); exit 1 on any failure."""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATALOG = (REPO / ".." / "shared" / "datasets" / "clothing-dataset").resolve()
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "fashion_cir.cli", *args]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int | None, float]:
    """Run ``cmd``; with ``kill_after``, SIGKILL it then (None when it finished first). Returns
    (exit status or None when killed, seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return None, time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({process.returncode}): {process.stderr.read().decode()[-400:]}")
    return 0, time.perf_counter() - start


# -- checks -------------------------------------------------------------------------------------------
def index_state(folder: Path) -> str:
    """What a kill left in an index folder; raises when a manifest exists but does not load."""
    from fashion_cir.retrieval.index import CatalogIndex

    if not (folder / "index.json").exists():
        return "no index yet"
    index = CatalogIndex.load(folder)  # must load whatever moment the kill hit
    leftovers = sorted(p.name for p in folder.glob(".data-*.tmp")) + \
        [p.name for p in folder.glob("data-*") if p.name != index.config["data"]]
    return f"index of {len(index)} loads" + (" + leftovers" if leftovers else "")


def check_index(folder: Path, reference: dict[str, np.ndarray]) -> None:
    from fashion_cir.retrieval.index import CatalogIndex

    index = CatalogIndex.load(folder)
    assert len(index.ids) == len(set(index.ids)), "duplicate ids"
    assert sorted(index.ids) == sorted(reference), f"ids differ: {len(index.ids)} vs {len(reference)}"
    got = {i: index.features[r] for r, i in enumerate(index.ids)}
    worst = max(float(np.abs(got[i] - reference[i]).max()) for i in reference)
    assert worst < 1e-3, f"features differ from the reference by {worst}"
    data = [p.name for p in folder.glob("data-*")]
    assert data == [index.config["data"]] and not list(folder.glob(".data-*.tmp")), f"leftover folders {data}"


def cache_entries(root: Path) -> tuple[list[str], int]:
    ids = []
    for shard in root.glob("*/part-*.npz"):
        with np.load(shard) as data:
            ids += [str(i) for i in data["ids"]]
    return ids, len(list(root.glob("*/*.corrupt")))


# -- operations -------------------------------------------------------------------------------------------
class Op:
    name = ""

    def __init__(self, work: Path, images: Path, ids: list[str]):
        self.work, self.images, self.ids = work / self.name, images, ids
        self.work.mkdir(parents=True, exist_ok=True)

    def prepare(self, cycle: int) -> None: ...
    def command(self) -> list[str]: ...
    def state(self) -> str: ...
    def check(self) -> None: ...


class Build(Op):
    name = "index build"

    def __init__(self, *args):
        super().__init__(*args)
        (self.work / "all.json").write_text(json.dumps(self.ids))

    def prepare(self, cycle: int) -> None:
        if cycle % 2 == 0:  # from scratch; odd cycles overwrite the complete index of the last cycle
            shutil.rmtree(self.work / "index", ignore_errors=True)
        shutil.rmtree(self.work / "index" / "feature-cache", ignore_errors=True)

    def command(self) -> list[str]:
        return cli("index", "build", str(self.work / "index"), "--images", str(self.images), "--split",
                   str(self.work / "all.json"), "--backbone", "tiny", "--batch-size", "8", "--overwrite")

    def state(self) -> str:
        return index_state(self.work / "index")

    def check(self) -> None:
        check_index(self.work / "index", self.reference)


class Add(Build):
    name = "index add"

    def __init__(self, *args):
        super().__init__(*args)
        (self.work / "base.json").write_text(json.dumps(self.ids[: len(self.ids) // 2]))
        base = self.work / "base-index"
        if not (base / "index.json").exists():
            run(cli("index", "build", str(base), "--images", str(self.images), "--split", str(self.work / "base.json"),
                    "--backbone", "tiny", "--batch-size", "8"))
        shutil.rmtree(base / "feature-cache", ignore_errors=True)

    def prepare(self, cycle: int) -> None:
        shutil.rmtree(self.work / "index", ignore_errors=True)
        shutil.copytree(self.work / "base-index", self.work / "index")

    def command(self) -> list[str]:
        return cli("index", "add", str(self.work / "index"), "--images", str(self.images), "--split",
                   str(self.work / "all.json"), "--backbone", "tiny")


class Cache(Op):
    name = "feature cache"

    def prepare(self, cycle: int) -> None:
        shutil.rmtree(self.work / "cache", ignore_errors=True)

    def command(self) -> list[str]:
        return [PYTHON, str(Path(__file__).resolve()), "--worker-cache", str(self.work / "cache"), str(self.images),
                json.dumps(self.ids)]

    def state(self) -> str:
        ids, corrupt = cache_entries(self.work / "cache")
        assert not corrupt, "a shard was torn"
        return f"{len(ids)} of {len(self.ids)} cached" if ids else "nothing cached"

    def check(self) -> None:
        ids, corrupt = cache_entries(self.work / "cache")
        assert not corrupt and len(ids) == len(set(ids)) == len(self.ids), f"{len(ids)} entries, {len(set(ids))} ids"
        from fashion_cir.features.cache import FeatureCache
        from fashion_cir.models.factory import create_backbone

        cache = FeatureCache(self.work / "cache")
        got_ids, features = cache.encode(create_backbone("tiny"), {i: self.images / f"{i}.jpg" for i in self.ids}, progress=False)
        assert cache.last_stats.computed == 0 and got_ids == self.ids
        worst = max(float(np.abs(f - self.reference[i]).max()) for i, f in zip(got_ids, features))
        assert worst < 1e-3, f"features differ by {worst}"


def make_training_data(folder: Path, images: Path, ids: list[str]) -> Path:
    """Triplets over the catalog photos (train: first 24, val: next 8) and a stage-1 config."""
    rng = random.Random(0)
    train, val = ids[:24], ids[24:32]
    colours = ["red", "blue", "black", "white", "green"]

    def triplets(pool, n):
        return [{"candidate": a, "target": b, "captions": [f"is {rng.choice(colours)}", f"has a {rng.choice(colours)} print"]}
                for a, b in (rng.sample(pool, 2) for _ in range(n))]

    for name, content in {"train": triplets(train, 32), "val": triplets(val, 8), "split_train": train, "split_val": val}.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    source = lambda name, split: {"captions": str(folder / f"{name}.json"), "split": str(folder / f"{split}.json"),  # noqa: E731
                                  "images": str(images)}
    config = {"out_dir": str(folder / "run"), "backbone": "tiny", "query_mode": "sum", "train": [source("train", "split_train")],
              "val": [{**source("val", "split_val"), "name": "val"}],
              "stage1": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "encoders": "text", "checkpoint_every": 1,
                         "log_every": 1, "progress": False, "num_workers": 0},
              "stage2": None}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


class Train(Op):
    name = "training"

    def __init__(self, *args):
        super().__init__(*args)
        self.config = make_training_data(self.work, self.images, self.ids)

    def prepare(self, cycle: int) -> None:
        shutil.rmtree(self.work / "run", ignore_errors=True)

    def command(self) -> list[str]:
        return cli("train", "run", "--config", str(self.config), "--stage", "1")

    def state(self) -> str:
        stage = self.work / "run" / "stage1"
        if (stage / "summary.json").exists():
            return "finished"
        if (stage / "checkpoint.pt").exists():
            import torch

            return f"checkpoint at step {torch.load(stage / 'checkpoint.pt', weights_only=True)['progress']['global_step']}"
        return "no checkpoint yet"

    def check(self) -> None:
        import torch

        stage = self.work / "run" / "stage1"
        weights = torch.load(stage / "model" / "weights.pt", weights_only=True)
        assert weights.keys() == self.reference.keys() and all(torch.equal(weights[k], self.reference[k]) for k in weights), \
            "final weights differ from the uninterrupted run"
        steps = [r["step"] for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        total = json.loads((stage / "summary.json").read_text())["global_step"]
        assert steps == list(range(1, total + 1)), f"logged steps {steps}"


def reference(op: Op) -> float:
    """Run ``op`` once uninterrupted; store what a complete result must equal. Returns its seconds."""
    op.prepare(0)
    _, seconds = run(op.command())
    if isinstance(op, Train):
        import torch

        op.reference = torch.load(op.work / "run" / "stage1" / "model" / "weights.pt", weights_only=True)
    elif isinstance(op, Cache):
        from fashion_cir.features.cache import FeatureCache
        from fashion_cir.models.factory import create_backbone

        ids, features = FeatureCache(op.work / "cache").encode(create_backbone("tiny"), {i: op.images / f"{i}.jpg" for i in op.ids},
                                                               progress=False)
        op.reference = dict(zip(ids, features))
    else:
        from fashion_cir.retrieval.index import CatalogIndex

        index = CatalogIndex.load(op.work / "index")
        op.reference = {i: index.features[r] for r, i in enumerate(index.ids)}
    op.check()
    return seconds


def worker_cache(root: str, images: str, ids: str) -> None:
    from fashion_cir.features.cache import FeatureCache
    from fashion_cir.models.factory import create_backbone

    FeatureCache(root, flush_every=8).encode(create_backbone("tiny"), {i: Path(images) / f"{i}.jpg" for i in json.loads(ids)},
                                             batch_size=4, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per operation")
    parser.add_argument("--images", type=int, default=96, help="catalog photos used")
    parser.add_argument("--ops", default="build,add,cache,train")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-killloop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-cache", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_cache:
        worker_cache(*args.worker_cache)
        return 0
    sys.path.insert(0, str(REPO / "src"))
    rng = random.Random(args.seed)
    images = CATALOG / "images"
    ids = sorted(p.stem for p in images.glob("*.jpg"))[: args.images]
    _, import_seconds = run([PYTHON, "-c", "import fashion_cir.cli, torch, open_clip, faiss"])
    print(f"catalog: {len(ids)} photos from {images}; python import time {import_seconds:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    ops = {"build": Build, "add": Add, "cache": Cache, "train": Train}
    failures, summary = [], {}
    for key in args.ops.split(","):
        op = ops[key](args.work, images, ids)
        full = reference(op)
        states: collections.Counter = collections.Counter()
        kills = 0
        for cycle in range(1, args.kills + 1):
            op.prepare(cycle)
            moment = rng.uniform(0.8 * import_seconds, full)
            status, seconds = run(op.command(), kill_after=moment)
            try:
                state = "finished before the kill" if status == 0 else op.state()
                states[state.split(" + ")[0] if "index of" not in state else state] += 1
                kills += status is None
                run(op.command())
                op.check()
                verdict = "ok"
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                verdict = f"FAILED: {type(exc).__name__}: {exc}"
                failures.append(f"{op.name} cycle {cycle}: {verdict}")
            print(f"{op.name:13s} cycle {cycle:2d}: killed at {moment:5.1f}s of {full:4.1f}s -> {state}; re-run: {verdict}", flush=True)
        summary[op.name] = {"kills": kills, "reference_seconds": round(full, 1), "states": dict(states)}
    print(json.dumps({"summary": summary, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
