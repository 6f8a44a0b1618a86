"""`fashion-cir demo --fast` (the demo recipe's fast profile through `fashion-cir run`): every step
runs on real photos with the real offline backbone, a re-run repeats no work, and every published
model folder loads in `fashion-cir evaluate --model`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # scheduled first (conftest)

STAGES = ("zero-shot", "zero-shot-fused", "stage1", "stage2")
VAL_SETS = ("annotated-val", "relative-val", "minpairs-val")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    cmd = [sys.executable, "-m", "fashion_cir.cli", "demo", "--fast", "--no-serve", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first.stdout, second.stdout


def test_every_stage_is_published_and_reported(demo_run):
    out, stdout, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    reported = {row["stage"] for row in results["rows"]}
    assert reported == {"random", "zero-shot-no-prompt", "best-predicted-prompt", *STAGES}
    assert {row["protocol"] for row in results["rows"]} == {"split", "catalog"}
    for stage in STAGES:
        assert (out / stage / "model.json").is_file() and (out / stage / "weights.pt").is_file()
    selected = json.loads((out / "best" / "selected.json").read_text())
    assert selected["stage"] in STAGES and selected["stage"] == results["best"]
    for row in results["rows"]:
        assert 0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= row["R@50"] <= 100
    assert "| model | mode | protocol | set |" in stdout and "Paired differences" in stdout
    for name in (
        *(f"examples-{s}.png" for s in VAL_SETS),
        "triplets.png",
        "training.png",
        "index/index.json",
        "run.json",
        "triplets/train.json",
        "train/stage2/curve.png",
        "timings.json",
    ):
        assert (out / name).is_file(), name


def test_warm_rerun_reuses_everything(demo_run):
    out, first, rerun = demo_run
    assert "reusing the aligned offline backbone" in rerun and "triplets from" not in rerun
    assert "attribute heads (trained)" in first and "attribute heads (reused)" in rerun
    for stage in STAGES[2:]:  # every training run started once; the re-run found them finished
        events = [
            line for line in (out / "train" / stage / "metrics.jsonl").read_text().splitlines() if '"event"' in line
        ]
        assert sum('"event": "start"' in line for line in events) == 1, stage
        assert f"{stage} epoch 1/1: done" in first and f"{stage} epoch 1/1" not in rerun
    assert first.split("Results (val):")[1].split("\n[")[0] == rerun.split("Results (val):")[1].split("\n[")[0]


def test_published_models_load_in_evaluate(demo_run, shared_dir, tmp_path):
    out, _, _ = demo_run
    root = shared_dir / "clothing-dataset"
    metrics = tmp_path / "m.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_cir.cli",
            "evaluate",
            "--model",
            str(out / "stage2"),
            "--captions",
            str(root / "captions" / "cap.clothing.val.json"),
            "--split-file",
            str(root / "image_splits" / "split.clothing.val.json"),
            "--images",
            str(root / "images"),
            "--cache-dir",
            str(out / "features"),
            "--descriptions",
            str(root / "attributes.jsonl"),
            "--json",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(metrics.read_text())
    assert report["cap.clothing.val"]["n_queries"] == 240 and report["query_mode"] == "sum"


def test_stages_train_their_top_blocks_and_refit_their_fusion(demo_run):
    """Stage 1 trains the text tower's last two blocks and projection from the fused zero-shot model
    (lower blocks frozen, so not saved) and fits its fusion again; stage 2 starts from stage 1."""
    import torch

    out, _, _ = demo_run
    start, stage1, stage2 = (
        json.loads((out / name / "model.json").read_text()) for name in ("zero-shot-fused", "stage1", "stage2")
    )
    assert stage1["saved_prefixes"] == [
        "backbone.text_tower.encoder.layer.4.",
        "backbone.text_tower.encoder.layer.5.",
        "backbone.text_proj.",
    ]
    before, after = (
        torch.load(out / name / "weights.pt", map_location="cpu", weights_only=True)
        for name in ("zero-shot-fused", "stage1")
    )
    assert not torch.equal(before["backbone.text_proj.weight"], after["backbone.text_proj.weight"])
    assert stage1["fusion"] != start["fusion"] and stage2["fusion"] != stage1["fusion"]


def test_the_fitted_fusion_beats_the_image_only_zero_shot(demo_run):
    """The fused query (reference + caption + descriptions + attributes, weights fitted on the annotated
    training captions) finds more targets than the image-side zero-shot query: paired interval above 0."""
    from fashion_cir.evaluation.stats import paired_difference

    out, _, _ = demo_run
    ranks = json.loads((out / "results.json").read_text())["ranks"]
    for name in VAL_SETS:
        fused, image_side = ranks[f"zero-shot-fused/sum|split|{name}"], ranks[f"zero-shot/sum|split|{name}"]
        assert paired_difference(fused, image_side, 10)[1] > 0, name
