"""kill -9 at random points of ``index build``, ``index add``, feature caching and training, then
re-run: every cycle must end in a complete, consistent result with nothing lost or duplicated.

    nice -n 10 .venv/bin/python benchmarks/bench_killloop.py --kills 20 --images 96

Real commands in separate processes on real catalog photos (the first ``--images`` clothing
images, tiny model). Each run is a child forked from this process after the imports (the
command's own code runs in the child, which gets SIGKILL), so a run costs its work, not 10+ s of
importing torch on a loaded machine; BLAS/OpenMP pools stay single-threaded so forking is safe. Per operation: one uninterrupted run gives the reference and its duration T; then
each cycle starts the operation, SIGKILLs it at a random moment in [0.05 T, T], records
what the kill left (the state) and checks that whatever is on disk is still valid (an index
manifest that exists must load). The next cycle re-runs the same command on what the kill left
(so kills also hit resumed runs); after every ``--complete-every`` kills the command is re-run to
completion and the result compared with the reference, and the next cycle starts afresh:
  build  same ids (no duplicates), features equal the reference's, one data folder, no leftovers;
         every other cycle starts from a complete index that the build overwrites
  add    base index + new ids: all present once, features equal, old index loadable after any kill
  cache  FeatureCache (flush every 8 images): every id once across the shards, features equal
  train  stage 1 (tiny, checkpoint every step): final weights bit-identical to the reference,
         each step's loss logged exactly once
Prints one line per cycle and a summary (kills per op, states seen, failures); exit 1 on any failure."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch/faiss: no thread pools, so fork is safe
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import collections
import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATALOG = (REPO / ".." / "shared" / "datasets" / "clothing-dataset").resolve()


def cli(*args: str) -> list[str]:
    return ["cli", *args]


def _child(cmd: list[str]) -> int:
    """Run one command in the forked child; its exit status."""
    import torch

    torch.set_num_threads(1)
    kind, args = cmd[0], cmd[1:]
    try:
        if kind == "cli":
            from fashion_cir.cli import app

            app(args=args, prog_name="fashion-cir", standalone_mode=True)
        else:
            worker_cache(*args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in a forked child; with ``kill_after``, SIGKILL it then (None when it finished
    first). Returns (exit status or None when killed, seconds)."""
    start = time.perf_counter()
    with open(REPO / "runs" / "killloop-child.log", "ab") as log:
        pid = os.fork()
        if pid == 0:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            code = 1
            try:
                code = _child(cmd)
            finally:
                os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kill_after is not None and time.perf_counter() - start >= kill_after:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, time.perf_counter() - start
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {code} (see runs/killloop-child.log)")
    return 0, time.perf_counter() - start


# -- checks -------------------------------------------------------------------------------------------
def index_state(folder: Path) -> str:
    """What a kill left in an index folder; raises when a manifest exists but does not load."""
    from fashion_cir.retrieval.faiss_store import CatalogIndex

    if not (folder / "index.json").exists():
        return "no index yet"
    index = CatalogIndex.load(folder)  # must load whatever moment the kill hit
    leftovers = sorted(p.name for p in folder.glob(".data-*.tmp")) + [
        p.name for p in folder.glob("data-*") if p.name != index.config["data"]
    ]
    return f"index of {len(index)} loads" + (" + leftovers" if leftovers else "")


def check_index(folder: Path, reference: dict[str, np.ndarray]) -> None:
    from fashion_cir.retrieval.faiss_store import CatalogIndex

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
        return cli(
            "index",
            "build",
            str(self.work / "index"),
            "--images",
            str(self.images),
            "--split",
            str(self.work / "all.json"),
            "--backbone",
            "tiny",
            "--batch-size",
            "8",
            "--overwrite",
        )

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
            run(
                cli(
                    "index",
                    "build",
                    str(base),
                    "--images",
                    str(self.images),
                    "--split",
                    str(self.work / "base.json"),
                    "--backbone",
                    "tiny",
                    "--batch-size",
                    "8",
                )
            )
        shutil.rmtree(base / "feature-cache", ignore_errors=True)

    def prepare(self, cycle: int) -> None:
        shutil.rmtree(self.work / "index", ignore_errors=True)
        shutil.copytree(self.work / "base-index", self.work / "index")

    def command(self) -> list[str]:
        return cli(
            "index",
            "add",
            str(self.work / "index"),
            "--images",
            str(self.images),
            "--split",
            str(self.work / "all.json"),
            "--backbone",
            "tiny",
        )


class Cache(Op):
    name = "feature cache"

    def prepare(self, cycle: int) -> None:
        shutil.rmtree(self.work / "cache", ignore_errors=True)

    def command(self) -> list[str]:
        return ["cache", str(self.work / "cache"), str(self.images), json.dumps(self.ids)]

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
        got_ids, features = cache.encode(
            create_backbone("tiny"), {i: self.images / f"{i}.jpg" for i in self.ids}, progress=False
        )
        assert cache.last_stats.computed == 0 and got_ids == self.ids
        worst = max(float(np.abs(f - self.reference[i]).max()) for i, f in zip(got_ids, features))
        assert worst < 1e-3, f"features differ by {worst}"


def make_training_data(folder: Path, images: Path, ids: list[str]) -> Path:
    """Triplets over the catalog photos (train: first 24, val: next 8) and a stage-1 config."""
    rng = random.Random(0)
    train, val = ids[:24], ids[24:32]
    colours = ["red", "blue", "black", "white", "green"]

    def triplets(pool, n):
        return [
            {
                "candidate": a,
                "target": b,
                "captions": [f"is {rng.choice(colours)}", f"has a {rng.choice(colours)} print"],
            }
            for a, b in (rng.sample(pool, 2) for _ in range(n))
        ]

    for name, content in {
        "train": triplets(train, 32),
        "val": triplets(val, 8),
        "split_train": train,
        "split_val": val,
    }.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    source = lambda name, split: {"captions": str(folder / f"{name}.json"), "split": str(folder / f"{split}.json")}  # noqa: E731
    stage1 = {
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "encoders": "text",
        "checkpoint_every": 1,
        "log_every": 1,
        "num_workers": 0,
    }
    config = {
        "name": "killloop",
        "out": str(folder / "run"),
        "pictures": False,
        "catalog": {
            "images": str(images),
            "splits": {"train": [str(folder / "split_train.json")], "val": [str(folder / "split_val.json")]},
        },
        "towers": {"backbone": "tiny"},
        "model": {"query_mode": "sum", "text_template": "prompt"},
        "annotated": [source("train", "split_train")],
        "baselines": [
            {"name": "zero-shot", "variants": [{"label": "zero-shot", "text_template": "prompt", "modes": ["sum"]}]}
        ],
        "stages": [{"name": "stage1", "kind": "stage1", "start": "zero-shot", "data": ["annotated"], "config": stage1}],
        "evaluation": {"val": [{**source("val", "split_val"), "name": "val"}]},
    }
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
        return ["cli", "run", str(self.config)]

    def state(self) -> str:
        stage = self.work / "run" / "train" / "stage1"
        if (stage / "summary.json").exists():
            return "finished"
        if (stage / "checkpoint.pt").exists():
            import torch

            return f"checkpoint at step {torch.load(stage / 'checkpoint.pt', weights_only=True)['progress']['global_step']}"
        return "no checkpoint yet"

    def check(self) -> None:
        import torch

        stage = self.work / "run" / "train" / "stage1"
        weights = torch.load(stage / "model" / "weights.pt", weights_only=True)
        assert weights.keys() == self.reference.keys() and all(
            torch.equal(weights[k], self.reference[k]) for k in weights
        ), "final weights differ from the uninterrupted run"
        steps = [r["step"] for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        total = json.loads((stage / "summary.json").read_text())["global_step"]
        assert steps == list(range(1, total + 1)), f"logged steps {steps}"


def reference(op: Op) -> float:
    """Run ``op`` once uninterrupted; store what a complete result must equal. Returns its seconds."""
    op.prepare(0)
    _, seconds = run(op.command())
    if isinstance(op, Train):
        import torch

        op.reference = torch.load(op.work / "run" / "train" / "stage1" / "model" / "weights.pt", weights_only=True)
    elif isinstance(op, Cache):
        from fashion_cir.features.cache import FeatureCache
        from fashion_cir.models.factory import create_backbone

        ids, features = FeatureCache(op.work / "cache").encode(
            create_backbone("tiny"), {i: op.images / f"{i}.jpg" for i in op.ids}, progress=False
        )
        op.reference = dict(zip(ids, features))
    else:
        from fashion_cir.retrieval.faiss_store import CatalogIndex

        index = CatalogIndex.load(op.work / "index")
        op.reference = {i: index.features[r] for r, i in enumerate(index.ids)}
    op.check()
    return seconds


def worker_cache(root: str, images: str, ids: str) -> None:
    from fashion_cir.features.cache import FeatureCache
    from fashion_cir.models.factory import create_backbone

    FeatureCache(root, flush_every=8).encode(
        create_backbone("tiny"), {i: Path(images) / f"{i}.jpg" for i in json.loads(ids)}, batch_size=4, progress=False
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per operation")
    parser.add_argument("--images", type=int, default=96, help="catalog photos used")
    parser.add_argument("--ops", default="build,add,cache,train")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-killloop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--complete-every", type=int, default=5, help="re-run to completion and check after this many kills"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    start = time.perf_counter()
    import torch

    import fashion_cir.cli  # noqa: F401 - imported once here, inherited by every forked run
    import fashion_cir.pipeline  # noqa: F401
    from fashion_cir.models.factory import create_backbone

    torch.set_num_threads(1)
    create_backbone("tiny")  # warms open_clip's config and tokenizer files too
    import_seconds = time.perf_counter() - start
    rng = random.Random(args.seed)
    images = CATALOG / "images"
    ids = sorted(p.stem for p in images.glob("*.jpg"))[: args.images]
    print(
        f"catalog: {len(ids)} photos from {images}; imports {import_seconds:.1f} s (paid once); load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    ops = {"build": Build, "add": Add, "cache": Cache, "train": Train}
    failures, summary = [], {}
    for key in args.ops.split(","):
        op = ops[key](args.work, images, ids)
        full = reference(op)
        states: collections.Counter = collections.Counter()
        kills = completions = 0
        for cycle in range(1, args.kills + 1):
            if cycle % args.complete_every == 1 or args.complete_every == 1:
                op.prepare(cycle)
            moment = rng.uniform(0.05 * full, full)
            state, verdict = "?", "ok"
            try:
                status, _ = run(op.command(), kill_after=moment)
                kills += status is None
                state = "finished before the kill" if status == 0 else op.state()
                states[state] += 1
                if cycle % args.complete_every == 0 or cycle == args.kills:
                    run(op.command())
                    op.check()
                    completions += 1
                    verdict = "re-run to completion: equal to the reference"
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                verdict = f"FAILED: {type(exc).__name__}: {exc}"
                failures.append(f"{op.name} cycle {cycle}: {verdict}")
            print(
                f"{op.name:13s} cycle {cycle:2d}: killed at {moment:5.1f}s of {full:4.1f}s -> {state}; {verdict}",
                flush=True,
            )
        summary[op.name] = {
            "kills": kills,
            "completed_and_checked": completions,
            "reference_seconds": round(full, 1),
            "states": dict(states),
        }
    print(json.dumps({"summary": summary, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
