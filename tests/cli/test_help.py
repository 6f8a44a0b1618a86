"""The command line: real commands on real files; errors are one clear line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fashion_cir.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def clothing(shared_dir):
    root = shared_dir / "clothing-dataset"
    return {
        "captions": root / "captions" / "cap.clothing.val.json",
        "split": root / "image_splits" / "split.clothing.val.json",
        "images": root / "images",
    }


def test_every_command_has_help():
    for command in (
        ["--help"],
        ["evaluate", "--help"],
        ["demo", "--help"],
        ["caption", "--help"],
        ["triplets", "--help"],
        ["index", "build", "--help"],
        ["index", "add", "--help"],
        ["search", "--help"],
        ["serve", "--help"],
        ["align", "--help"],
        ["run", "--help"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_evaluate_writes_the_documented_json(clothing, tmp_path):
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--backbone",
            "tiny",
            "--captions",
            str(clothing["captions"]),
            "--split-file",
            str(clothing["split"]),
            "--images",
            str(clothing["images"]),
            "--mode",
            "sum",
            "--mode",
            "image",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    for key in ("cap.clothing.val", "average"):
        assert set(metrics[key]) >= {"R@1", "R@5", "R@10", "R@50", "n_queries", "n_gallery", "missing"}
    assert metrics["cap.clothing.val"]["n_queries"] == 240 and metrics["cap.clothing.val"]["n_gallery"] == 563
    assert metrics["query_mode"] == "sum" and set(metrics["by_mode"]) == {"sum", "image"}
    assert "R@10" in result.output


def test_unknown_backbone_is_one_clear_line(clothing):
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--backbone",
            "nonsense:x",
            "--captions",
            str(clothing["captions"]),
            "--split-file",
            str(clothing["split"]),
            "--images",
            str(clothing["images"]),
        ],
    )
    assert result.exit_code == 2
    assert "unknown backbone 'nonsense:x'" in result.output and "Traceback" not in result.output


def test_malformed_captions_name_file_and_line(clothing, tmp_path):
    bad = tmp_path / "cap.json"
    bad.write_text('[{"candidate": "a", "target": "b", "captions": ["x"]},\n  {"candidate": }]')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_cir.cli",
            "evaluate",
            "--backbone",
            "tiny",
            "--captions",
            str(bad),
            "--split-file",
            str(clothing["split"]),
            "--images",
            str(clothing["images"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"malformed captions file {bad}" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_images_folder_is_reported(clothing, tmp_path):
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--backbone",
            "tiny",
            "--captions",
            str(clothing["captions"]),
            "--split-file",
            str(clothing["split"]),
            "--images",
            str(tmp_path / "none"),
        ],
    )
    assert result.exit_code == 2 and "images folder not found" in result.output


def test_evaluate_catalog_protocol_unions_gallery_files_and_leaves_the_reference_out(clothing, tiny_model, tmp_path):
    import numpy as np

    from fashion_cir.features.cache import FeatureCache

    val_ids = json.loads(clothing["split"].read_text())
    extra_ids = json.loads((clothing["split"].parent / "split.clothing.test.json").read_text())[:25]
    (tmp_path / "extra.json").write_text(json.dumps(extra_ids))
    cache = FeatureCache(tmp_path / "cache")
    ids, features = cache.encode(
        tiny_model.backbone, {i: clothing["images"] / f"{i}.jpg" for i in val_ids + extra_ids}, progress=False
    )
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    # each query's target is its reference's nearest other image: image-only search finds it first
    captions = [
        {"candidate": ids[q], "target": ids[int(similarity[q].argmax())], "captions": ["is similar", "same"]}
        for q in range(0, 400, 20)
    ]
    (tmp_path / "cap.json").write_text(json.dumps(captions))
    common = [
        "evaluate",
        "--backbone",
        "tiny",
        "--captions",
        str(tmp_path / "cap.json"),
        "--images",
        str(clothing["images"]),
        "--mode",
        "image",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    split = runner.invoke(
        app, common + ["--split-file", str(clothing["split"]), "--reliance", "--json", str(tmp_path / "split.json")]
    )
    cirr = runner.invoke(
        app,
        common + ["--split-file", str(clothing["split"]), "--remove-reference", "--json", str(tmp_path / "cirr.json")],
    )
    catalog = runner.invoke(
        app,
        common
        + [
            "--gallery-split-file",
            str(clothing["split"]),
            "--gallery-split-file",
            str(tmp_path / "extra.json"),
            "--json",
            str(tmp_path / "catalog.json"),
        ],
    )
    assert split.exit_code == 0 and catalog.exit_code == 0 and cirr.exit_code == 0, (
        split.output + catalog.output + cirr.output
    )
    split_metrics = json.loads((tmp_path / "split.json").read_text())
    catalog_metrics = json.loads((tmp_path / "catalog.json").read_text())
    cirr_metrics = json.loads((tmp_path / "cirr.json").read_text())
    assert (split_metrics["protocol"], catalog_metrics["protocol"], cirr_metrics["protocol"]) == (
        "split",
        "catalog",
        "cirr",
    )
    # the split's gallery with the reference left out: a target inside it is first (duplicate photos can tie)
    in_split = 100.0 * sum(c["target"] in set(val_ids) for c in captions) / len(captions)
    assert cirr_metrics["cap"]["n_gallery"] == 563 and in_split - 10.0 <= cirr_metrics["cap"]["R@1"] <= in_split
    # --reliance: the same queries with shuffled references, and the drop in R@10
    assert split_metrics["cap"]["reliance"] == pytest.approx(
        split_metrics["cap"]["R@10"] - split_metrics["cap"]["R@10_shuffled"]
    )
    assert "reliance" not in catalog_metrics["cap"] and "R@10_shuffled" not in catalog_metrics["cap"]
    assert catalog_metrics["cap"]["n_gallery"] == 563 + 25 and split_metrics["cap"]["n_gallery"] == 563
    # the reference kept, it ranks first and its nearest neighbour second; left out, the target is first
    assert split_metrics["cap"]["R@1"] == 0.0
    assert catalog_metrics["cap"]["R@1"] >= 90.0  # (exact duplicate photos in the catalog can tie)
