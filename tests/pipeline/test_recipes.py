"""`fashion-cir run` on the paper recipe (configs/fashioniq_vitb32.json, its `tiny` profile) over a
small FashionIQ-shaped catalog: captioning (precomputed backend), triplet generation, zero-shot,
stage 1, stage 2, evaluation, selection and pictures, end to end; then a re-run that does no
repeated work, and recipe errors that name the field."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow  # scheduled first (conftest)

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = {"dress": "dress", "shirt": "shirt", "toptee": "t-shirt"}
COLORS = ["red", "blue", "green", "black", "white", "yellow"]
RGB = {
    "red": (200, 30, 30),
    "blue": (30, 30, 200),
    "green": (30, 160, 30),
    "black": (10, 10, 10),
    "white": (240, 240, 240),
    "yellow": (230, 220, 40),
}


def fashioniq_catalog(root: Path, n_train: int = 10, n_val: int = 6) -> dict[str, str]:
    """FashionIQ's layout: images/, captions/cap.<cat>.<split>.json, image_splits/split.<cat>.<split>.json,
    plus an MLLM attributes.jsonl for the precomputed captioning backend."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    (root / "image_splits").mkdir()
    records = []
    for category, label in CATEGORIES.items():
        for split, n in (("train", n_train), ("val", n_val)):
            ids = [f"{category}-{split}-{i:02d}" for i in range(n)]
            for image_id in ids:
                color = rng.choice(COLORS)
                noise = np.random.default_rng(len(records)).integers(100, 156, size=(40, 32, 3), dtype=np.uint8)
                image = Image.fromarray(noise)  # a distinct photo each (the caption cache keys by content)
                ImageDraw.Draw(image).rectangle([6, 6, 26, 34], fill=RGB[color])
                image.save(root / "images" / f"{image_id}.png")
                records.append(
                    {
                        "image": image_id,
                        "category": label,
                        "color": color,
                        "secondary_color": None,
                        "pattern": "solid",
                        "sleeves": rng.choice(["short", "long"]),
                        "neckline": "crew",
                        "length": "hip",
                        "material": "cotton",
                        "closure": "none",
                        "kids": False,
                        "description": f"a {color} {label}",
                    }
                )
            triplets = []
            for _ in range(n):
                a, b = rng.sample(ids, 2)
                triplets.append({"candidate": a, "target": b, "captions": [f"is {rng.choice(COLORS)}", "looks nicer"]})
            (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(ids))
            (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(triplets))
    (root / "attributes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "FASHIONIQ_ROOT": str(root),
        "FASHIONIQ_IMAGES": str(root / "images"),
        "FASHIONIQ_ATTRIBUTES": str(root / "attributes.jsonl"),
    }


def run_cli(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fashion_cir.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashioniq")
    env = fashioniq_catalog(root / "data")
    out = root / "run"
    args = ["run", "configs/fashioniq_vitb32.json", "--profile", "tiny", "--set", f"out={out}"]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli(args, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, env, first.stdout, second.stdout


def test_the_paper_recipe_runs_every_step(paper_run):
    out, _, stdout, _ = paper_run
    results = json.loads((out / "results.json").read_text())
    assert {r["set"] for r in results["rows"]} == set(CATEGORIES)
    assert {r["stage"] for r in results["rows"]} == {"random", "zero-shot", "stage1", "stage2"}
    assert results["best"] in ("zero-shot", "stage1", "stage2")
    for name in ("zero-shot", "stage1", "stage2", "best"):
        assert (out / name / "model.json").is_file(), name
    for stage in ("stage1", "stage2"):  # the trainer's files and the curve beside them
        for name in ("metrics.jsonl", "checkpoint.pt", "config.json", "curve.png"):
            assert (out / "train" / stage / name).is_file(), (stage, name)
    assert "stage1 before training: val R@10" in stdout and "stage1 epoch 2/2: val R@10" in stdout  # on the console
    records = [json.loads(line) for line in (out / "train" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val" in r] == [-1, 0, 1]  # the curve's start, then each epoch
    generated = json.loads((out / "triplets" / "train.json").read_text())
    assert generated and all(t["candidate"].split("-")[1] == "train" for t in generated)
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["towers"]["backbone"] == "tiny" and run["git_commit"]
    assert any(name.endswith("cap.dress.train.json") for name in run["inputs"])
    assert all(len(sha) == 40 for sha in run["inputs"].values())
    for picture in [f"examples-{name}.png" for name in CATEGORIES] + [
        "triplets.png",
        "training.png",
    ]:  # one per val set
        assert (out / picture).stat().st_size > 1000, picture
    timings = json.loads((out / "timings.json").read_text())  # each step timed, in the order it ran
    steps = [t["step"] for t in timings["steps"]]
    assert (
        steps.index("baseline zero-shot")
        < steps.index("train stage1")
        < steps.index("train stage2")
        < steps.index("pictures")
    )
    assert all(t["seconds"] >= 0 and t["peak_rss_mb"] > 0 for t in timings["steps"])
    assert timings["total_seconds"] >= sum(t["seconds"] for t in timings["steps"]) - 0.1 * len(steps)  # rounding
    assert "Time per step:" in stdout


def test_a_rerun_repeats_no_work(paper_run):
    out, _, first, second = paper_run
    assert "triplets from" in first and "triplets from" not in second
    metrics = (out / "train" / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in metrics) == 1  # the re-run resumed the finished run
    table = lambda stdout: stdout.split("Results (val):")[1].split("\n[")[0]  # noqa: E731
    assert "| stage2 | sum_raw | split | dress |" in table(first) and table(first) == table(second)  # same figures


def test_changed_training_data_trains_again(paper_run, tmp_path):
    out, env, _, _ = paper_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    result = run_cli(
        [
            "run",
            "configs/fashioniq_vitb32.json",
            "--profile",
            "tiny",
            "--set",
            f"out={copy}",
            "--set",
            "generate.train.seed=1",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage1: its start model, triplets or settings changed; training it again" in result.stdout
    result = run_cli(
        [
            "run",
            "configs/fashioniq_vitb32.json",
            "--profile",
            "tiny",
            "--set",
            f"out={copy}",
            "--set",
            "generate.train.seed=1",
            "--set",
            "stages.1.config.lr=0.0003",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "stage1: its start" not in result.stdout
        and "stage2: its start model, triplets or settings changed" in result.stdout
    )


def test_recipe_errors_name_the_field(tmp_path):
    def fails(*args: str, env: dict[str, str] | None = None) -> str:
        result = run_cli(["run", "configs/fashioniq_vitb32.json", "--set", f"out={tmp_path / 'out'}", *args], env or {})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stderr

    assert "stage 'stage1' config" in (error := fails("--set", "stages.0.config.epochs=0")) and "epochs" in error
    assert "no profile 'nope'" in fails("--profile", "nope")
    assert "stage9" in fails("--set", "stages.1.start=stage9")
    assert "FASHIONIQ_ROOT" in fails(env={"FASHIONIQ_IMAGES": str(tmp_path)})


def test_a_caption_step_that_fails_for_most_images_stops_the_run(tmp_path):
    env = fashioniq_catalog(tmp_path / "data")
    attributes = Path(env["FASHIONIQ_ATTRIBUTES"])
    attributes.write_text("".join(attributes.read_text().splitlines(keepends=True)[:10]))  # 10 of 48 images described
    result = run_cli(
        ["run", "configs/fashioniq_vitb32.json", "--profile", "tiny", "--set", f"out={tmp_path / 'out'}"], env
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "38 of 48 images failed" in result.stderr and "captioning: 38 images without attributes" in result.stdout
