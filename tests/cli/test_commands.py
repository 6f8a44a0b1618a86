"""Every command end to end on two dozen real catalog photos (a dozen train, a dozen val), with the
tiny backbone (or the offline one for `align`): outputs checked against the inputs, exit codes, and
the one-line error of a bad input. `serve` runs as a real process on a loopback port of the
system's choosing (`--port 0`)."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fashion_cir.cli import app
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.retrieval.folder import open_index

N_TRAIN, N_VAL = 12, 12
runner = CliRunner()


def ok(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def json_in(text: str):
    """The JSON object a command printed among its other lines."""
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def one_line_error(args: list[str], *words: str) -> str:
    """Run a command that must fail on its input: exit 2, one `error: ...` line on stderr naming the
    problem (progress bars aside), no traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (args, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mini(clothing_dir, tmp_path_factory):
    """A clothing-format catalog of 24 real photos (symlinks into ../shared, which stays read-only):
    images/, attributes.jsonl, image_splits/ and a few hand-made FashionIQ-format captions."""
    root = tmp_path_factory.mktemp("mini") / "catalog"
    records = {
        json.loads(line)["image"]: json.loads(line)
        for line in (clothing_dir / "attributes.jsonl").read_text().splitlines()
        if line.strip()
    }
    splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        ids = json.loads((clothing_dir / "image_splits" / f"split.clothing.{split}.json").read_text())
        splits[split] = [i for i in ids if records.get(i, {}).get("description")][:n]
    (root / "images").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions").mkdir()
    for image_id in splits["train"] + splits["val"]:
        (root / "images" / f"{image_id}.jpg").symlink_to(clothing_dir / "images" / f"{image_id}.jpg")
    with (root / "attributes.jsonl").open("w") as handle:
        for image_id in splits["train"] + splits["val"]:
            handle.write(json.dumps(records[image_id]) + "\n")
    for split, ids in splits.items():
        (root / "image_splits" / f"split.clothing.{split}.json").write_text(json.dumps(ids))
        captions = [
            {"candidate": a, "target": b, "captions": [f"is {records[b]['color']}", f"is a {records[b]['category']}"]}
            for a, b in zip(ids, ids[1:] + ids[:1])
        ]
        (root / "captions" / f"cap.clothing.{split}.json").write_text(json.dumps(captions))
    (root / "image_splits" / "all.json").write_text(json.dumps(splits["train"] + splits["val"]))
    return {
        "root": root,
        "images": root / "images",
        "records": records,
        "train": splits["train"],
        "val": splits["val"],
        "train_split": root / "image_splits" / "split.clothing.train.json",
        "val_split": root / "image_splits" / "split.clothing.val.json",
        "all_split": root / "image_splits" / "all.json",
        "train_captions": root / "captions" / "cap.clothing.train.json",
        "val_captions": root / "captions" / "cap.clothing.val.json",
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def captioned(mini, clothing_dir, work):
    out = work / "attributes.jsonl"
    result = ok(
        [
            "caption",
            "--images",
            mini["images"],
            "--split-file",
            mini["train_split"],
            "--backend",
            "precomputed",
            "--model",
            clothing_dir / "attributes.jsonl",
            "--out",
            out,
            "--cache-dir",
            work / "caption-cache",
        ]
    )
    return out, result.output


@pytest.fixture(scope="module")
def triplets_file(mini, captioned, work):
    attributes, _ = captioned
    out = work / "generated.json"
    result = ok(
        [
            "triplets",
            "--attributes",
            attributes,
            "--images",
            mini["images"],
            "--train-split",
            mini["train_split"],
            "--out",
            out,
            "--backbone",
            "tiny",
            "--cache-dir",
            work / "features",
            "--band",
            "0",
            "1",
            "--hard-negatives",
            "2",
            "--targets-per-reference",
            "2",
            "--change-only-share",
            "0.5",
        ]
    )
    return out, json_in(result.stdout)


@pytest.fixture(scope="module")
def trained(mini, triplets_file, work):
    generated, _ = triplets_file
    source = lambda captions, split: {"captions": str(captions), "split": str(split)}  # noqa: E731
    recipe = {
        "name": "mini",
        "out": str(work / "train"),
        "pictures": False,
        "catalog": {
            "images": str(mini["images"]),
            "attributes": str(mini["root"] / "attributes.jsonl"),
            "splits": {"train": [str(mini["train_split"])], "val": [str(mini["val_split"])]},
        },
        "towers": {"backbone": "tiny"},
        "model": {"query_mode": "sum"},
        "annotated": [source(mini["train_captions"], mini["train_split"])],
        "generated": [source(generated, mini["train_split"])],
        "baselines": [
            {"name": "zero-shot", "variants": [{"label": "zero-shot", "text_template": "prompt", "modes": ["sum"]}]}
        ],
        "stages": [
            {
                "name": "stage1",
                "kind": "stage1",
                "start": "zero-shot",
                "config": {"epochs": 1, "batch_size": 4, "encoders": "text"},
            },
            {"name": "stage2", "kind": "stage2", "start": "stage1", "config": {"epochs": 1, "batch_size": 4}},
        ],
        "evaluation": {"val": [{**source(mini["val_captions"], mini["val_split"]), "name": "val"}]},
    }
    (work / "recipe.json").write_text(json.dumps(recipe))
    result = ok(["run", work / "recipe.json"])
    return work / "train", result.output


@pytest.fixture(scope="module")
def index_dir(mini, captioned, work):
    attributes, _ = captioned
    folder = work / "index"
    result = ok(
        [
            "index",
            "build",
            folder,
            "--images",
            mini["images"],
            "--split",
            mini["train_split"],
            "--metadata",
            mini["root"] / "attributes.jsonl",
            "--backbone",
            "tiny",
        ]
    )
    assert f"indexed {N_TRAIN} images into {folder}" in result.output
    return folder


# -- caption ------------------------------------------------------------------------------------


def test_caption_writes_one_validated_record_per_image(mini, captioned):
    out, output = captioned
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in written] == sorted(mini["train"]) or {r["image"] for r in written} == set(mini["train"])
    assert len(written) == N_TRAIN
    for record in written:
        source = mini["records"][record["image"]]
        for field in ("category", "color", "pattern", "description"):
            assert record[field] == source[field], (record["image"], field)
    assert f"captioned {N_TRAIN} of {N_TRAIN} images" in output


def test_caption_bad_inputs(mini, work, tmp_path):
    one_line_error(
        [
            "caption",
            "--images",
            tmp_path / "nowhere",
            "--out",
            tmp_path / "a.jsonl",
            "--backend",
            "precomputed",
            "--model",
            mini["root"] / "attributes.jsonl",
        ],
        "images folder not found",
        "nowhere",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x", "description": "ok"}\n{"image": \n')
    one_line_error(
        [
            "caption",
            "--images",
            mini["images"],
            "--out",
            tmp_path / "a.jsonl",
            "--backend",
            "precomputed",
            "--model",
            bad,
            "--cache-dir",
            tmp_path / "c",
        ],
        "bad.jsonl",
        "line 2",
    )
    assert not (tmp_path / "a.jsonl").exists()


# -- triplets -----------------------------------------------------------------------------------


def test_triplets_are_mined_inside_the_train_split(mini, triplets_file):
    out, stats = triplets_file
    triplets = json.loads(out.read_text())
    train = set(mini["train"])
    assert 0 < len(triplets) <= 2 * N_TRAIN and stats["triplets"] == len(triplets)
    for t in triplets:
        assert t["candidate"] in train and t["target"] in train and t["candidate"] != t["target"]
        assert len(t["captions"]) == 2 and all(isinstance(c, str) and c for c in t["captions"])
        assert set(t["hard_negatives"]) <= train - {t["candidate"], t["target"]}
        changed = [
            a
            for a in ("category", "color", "pattern", "sleeves", "neckline", "length", "material")
            if mini["records"][t["candidate"]].get(a) != mini["records"][t["target"]].get(a)
        ]
        assert changed  # a generated pair always differs in some attribute
    assert out.with_suffix(".stats.json").is_file() and out.with_suffix(".config.json").is_file()
    change_only = sum(t["source"].endswith("/change-only") for t in triplets)
    assert stats["change_only"] == change_only and 0 < change_only < len(triplets)
    assert json.loads(out.with_suffix(".config.json").read_text())["config"]["change_only_share"] == 0.5


def test_triplets_bad_inputs(mini, captioned, tmp_path):
    attributes, _ = captioned
    args = [
        "triplets",
        "--attributes",
        attributes,
        "--images",
        mini["images"],
        "--train-split",
        mini["train_split"],
        "--out",
        tmp_path / "t.json",
        "--backbone",
        "tiny",
        "--cache-dir",
        tmp_path / "f",
    ]
    one_line_error(args + ["--band-unit", "furlong"], "bad triplet settings", "furlong")
    one_line_error(args + ["--change-only-share", "1.5"], "bad triplet settings", "change_only_share")
    one_line_error(["triplets", "--attributes", tmp_path / "none.jsonl", *args[3:]], "none.jsonl")
    assert not (tmp_path / "t.json").exists()


# -- align --------------------------------------------------------------------------------------


def test_align_writes_loadable_projections(mini, work):
    out = work / "offline"
    result = ok(
        ["align", "--catalog", mini["root"], "--out", out, "--cache-dir", work / "align-features", "--epochs", "2"]
    )
    summary = json_in(result.stdout)
    assert summary["train_pairs"] == N_TRAIN and summary["val_pairs"] == N_VAL and 1 <= summary["best_epoch"] <= 2
    assert f"use it as --backbone offline:{out}" in result.output
    backbone = create_backbone(f"offline:{out}")
    assert backbone.embed_texts(["a red dress"]).shape == (1, backbone.feature_dim)


def test_align_other_towers(mini, work):
    """``--towers`` picks the towers; the folder records them, so ``offline:DIR`` rebuilds the same."""
    out = work / "offline-hsv"
    result = ok(
        [
            "align",
            "--catalog",
            mini["root"],
            "--out",
            out,
            "--cache-dir",
            work / "align-features",
            "--epochs",
            "2",
            "--towers",
            "offline+blocks1+hsv",
        ]
    )
    assert f"use it as --backbone offline+hsv+blocks1:{out.resolve()}" in result.output
    backbone = create_backbone(f"offline:{out}")
    assert backbone.spec.startswith("offline+hsv+blocks1:") and backbone.image_proj.in_features == 1280 + 192
    one_line_error(
        ["align", "--catalog", mini["root"], "--out", out, "--towers", "offline+lite9"],
        "unknown offline backbone option 'lite9'",
    )


def test_align_bad_inputs(tmp_path):
    one_line_error(["align", "--catalog", tmp_path / "nowhere", "--out", tmp_path / "o"], "clothing catalog not found")
    (tmp_path / "cat" / "images").mkdir(parents=True)
    one_line_error(["align", "--catalog", tmp_path / "cat", "--out", tmp_path / "o"], "attributes file not found")


# -- run (a recipe), evaluate ----------------------------------------------------------------------


def test_run_trains_both_stages_and_selects(trained, mini):
    out, output = trained
    assert "best on val:" in output and "| stage2 | sum | split | val |" in output
    stage1, stage2 = CIRModel.load(out / "stage1"), CIRModel.load(out / "stage2")
    zero_shot = create_backbone("tiny")
    text = ["is red with long sleeves"]
    assert not np.allclose(stage1.backbone.embed_texts(text), zero_shot.embed_texts(text))  # the text side trained
    assert stage1.backbone.image_fingerprint() == zero_shot.image_fingerprint()  # the image side did not
    summary = json.loads((out / "train" / "stage2" / "summary.json").read_text())
    assert summary["bank_size"] == N_TRAIN and summary["annotated_triplets"] == N_TRAIN
    assert stage2.query_mode == "sum"
    selected = json.loads((out / "best" / "selected.json").read_text())
    assert selected["stage"] == max(selected["scores"], key=selected["scores"].get)


def test_run_bad_recipe(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "name": "x",
                "out": str(tmp_path / "out"),
                "catalog": {"images": "${NO_SUCH_VAR_13}/images", "splits": {"train": ["s"]}},
            }
        )
    )
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "NO_SUCH_VAR_13" in result.output and "Traceback" not in result.output
    recipe.write_text(
        json.dumps(
            {
                "name": "x",
                "out": "o",
                "catalog": {"images": "i", "splits": {}},
                "stages": [{"name": "s1", "kind": "stage1", "start": "zero-shot", "config": {"batch_size": "big"}}],
            }
        )
    )
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "batch_size" in result.output and "'big'" in result.output


def test_evaluate_a_trained_model_on_the_val_captions(trained, mini, work):
    out, _ = trained
    metrics_file = work / "metrics.json"
    result = ok(
        [
            "evaluate",
            "--model",
            out / "stage2",
            "--captions",
            mini["val_captions"],
            "--split-file",
            mini["val_split"],
            "--images",
            mini["images"],
            "--cache-dir",
            work / "features",
            "--json",
            metrics_file,
            "--descriptions",
            mini["root"] / "attributes.jsonl",
        ]
    )  # the prompts the model was trained with
    metrics = json.loads(metrics_file.read_text())
    row = metrics["cap.clothing.val"]
    assert row["n_queries"] == N_VAL and row["n_gallery"] == N_VAL and row["missing"] == 0
    assert row["R@50"] == 100.0 and row["R@1"] <= row["R@5"] <= row["R@10"] <= 100.0  # 12 items: all within 50
    assert metrics["query_mode"] == "sum" and "R@10" in result.output and metrics["describe"] == "catalog"


# -- index build / add, search ------------------------------------------------------------------


def test_index_build_then_add_only_encodes_new_items(index_dir, mini, tmp_path):
    index = open_index(index_dir)
    assert sorted(index.ids) == sorted(mini["train"])
    assert index.metadata[mini["train"][0]]["description"] == mini["records"][mini["train"][0]]["description"]
    # new metadata for an item already indexed: `index add` leaves indexed items as they are
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"image": mini["train"][0], "description": "a completely new text"}) + "\n")
    result = ok(
        [
            "index",
            "add",
            index_dir,
            "--images",
            mini["images"],
            "--split",
            mini["all_split"],
            "--metadata",
            mini["root"] / "attributes.jsonl",
            "--metadata",
            changed,
            "--backbone",
            "tiny",
        ]
    )
    report = json_in(result.stdout)
    assert f"index now holds {N_TRAIN + N_VAL} images" in result.output
    assert report["already_indexed"] == N_TRAIN and report["added"] == N_VAL and report["computed"] == N_VAL
    grown = open_index(index_dir)
    assert sorted(grown.ids) == sorted(mini["train"] + mini["val"])
    assert grown.metadata[mini["train"][0]]["description"] == mini["records"][mini["train"][0]]["description"]
    assert grown.metadata[mini["val"][0]]["color"] == mini["records"][mini["val"][0]]["color"]
    again = ok(["index", "add", index_dir, "--images", mini["images"], "--backbone", "tiny"])
    assert json_in(again.stdout)["added"] == 0


def test_index_bad_inputs(index_dir, mini, tmp_path):
    one_line_error(["index", "build", index_dir, "--images", mini["images"], "--backbone", "tiny"], "already exists")
    one_line_error(
        ["index", "build", tmp_path / "i", "--images", tmp_path / "none", "--backbone", "tiny"],
        "catalog image folder not found",
    )
    one_line_error(["index", "add", index_dir, "--images", mini["images"], "--backbone", "tiny:1"], "fingerprint")


def test_search_by_id_and_by_image(index_dir, mini, tiny_model):
    reference = mini["train"][3]
    result = ok(
        [
            "search",
            "--index",
            index_dir,
            "--id",
            reference,
            "--text",
            "is red",
            "-k",
            "5",
            "--backbone",
            "tiny",
            "--json",
        ]
    )
    hits = json.loads(result.stdout)
    assert len(hits) == 5 and len({h["id"] for h in hits}) == 5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["metadata"]["description"] == mini["records"][h["id"]]["description"] for h in hits)
    # an image-only query with the catalog photo itself: that item first, cosine 1
    by_image = json.loads(
        ok(
            [
                "search",
                "--index",
                index_dir,
                "--image",
                mini["images"] / f"{reference}.jpg",
                "-k",
                "3",
                "--backbone",
                "tiny",
                "--json",
            ]
        ).stdout
    )
    assert by_image[0]["id"] == reference and by_image[0]["score"] == pytest.approx(1.0, abs=5e-3)
    table = ok(["search", "--index", index_dir, "--id", reference, "--text", "is red", "-k", "2", "--backbone", "tiny"])
    assert len(table.stdout.strip().splitlines()) == 2 and hits[0]["id"] in table.stdout


def test_search_bad_inputs(index_dir, tmp_path):
    one_line_error(
        ["search", "--index", index_dir, "--id", "no-such-item", "--text", "x", "--backbone", "tiny"], "no-such-item"
    )
    one_line_error(
        ["search", "--index", tmp_path, "--id", "x", "--text", "x", "--backbone", "tiny"],
        "not a fashion-cir index folder",
    )
    corrupt = tmp_path / "c.jpg"
    corrupt.write_bytes(b"not an image")
    one_line_error(["search", "--index", index_dir, "--image", corrupt, "--text", "x", "--backbone", "tiny"], "c.jpg")


# -- serve --------------------------------------------------------------------------------------


def listening_url(process: subprocess.Popen, limit_s: float = 300) -> str:
    """The address a `serve --port 0` process says it listens on ("Uvicorn running on http://..."),
    read from its output as it comes; the output goes on being drained while the process runs."""
    lines: queue.Queue = queue.Queue()

    def drain() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + limit_s  # a cold interpreter loading torch on a busy machine
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            pytest.fail(f"serve did not start listening within {limit_s:g} s: {''.join(seen)[-2000:]}")
        if line is None:
            pytest.fail(f"serve exited with {process.wait()}: {''.join(seen)[-2000:]}")
        seen.append(line)
        if found := re.search(r"Uvicorn running on (http://[\w.:]+)", line):
            return found.group(1)


def test_serve_answers_searches(index_dir, mini):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fashion_cir.cli",
            "serve",
            "--index",
            str(index_dir),
            "--backbone",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--sample-seed",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = listening_url(process)
        health = httpx.get(f"{url}/health", timeout=30).json()
        index = open_index(index_dir)
        assert health["items"] == len(index) and health["backbone"] == "tiny:0"
        assert health["page"]["sample_seed"] == 5
        reference = mini["train"][0]
        body = httpx.post(f"{url}/search", data={"id": reference, "text": "is red", "k": 100}, timeout=30).json()
        assert {r["id"] for r in body["results"]} == set(index.ids) - {reference}
        image = httpx.get(f"{url}/images/{reference}", timeout=30)
        assert image.content == (mini["images"] / f"{reference}.jpg").read_bytes()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_options_reach_the_app(index_dir, monkeypatch):
    """What `serve` hands the app (the subprocess test above serves for real)."""
    given: list[dict] = []
    monkeypatch.setattr("fashion_cir.serving.app.serve", lambda folder, model, **options: given.append(options))
    for flags in ([], ["--int8-queries", "--sample-seed", "3", "--max-upload-mb", "2"]):
        result = runner.invoke(app, ["serve", "--index", str(index_dir), "--backbone", "tiny", *flags])
        assert result.exit_code == 0, result.output
    assert (given[0]["int8_queries"], given[0]["sample_seed"], given[0]["max_upload_bytes"]) == (
        False,
        None,
        10 * 2**20,
    )
    assert (given[1]["int8_queries"], given[1]["sample_seed"], given[1]["max_upload_bytes"]) == (True, 3, 2 * 2**20)


def test_serve_bad_index(tmp_path):
    one_line_error(
        ["serve", "--index", tmp_path, "--backbone", "tiny", "--port", "0"], "not a fashion-cir index folder"
    )


# -- index build failures (issue 12) --
def test_index_build_lists_each_failure_with_its_reason_and_fails_past_the_share(tmp_path, make_jpeg):
    """Issue 12 item 14: a non-image x.jpg gave exit 0 and ``"failed_ids": ["x"]`` with no reason anywhere."""
    images = tmp_path / "images"
    for i in range(5):
        make_jpeg(images / f"good{i}.jpg", seed=i)
    (images / "x.jpg").write_text("not an image")
    result = runner.invoke(
        app, ["index", "build", str(tmp_path / "index"), "--images", str(images), "--backbone", "tiny"]
    )
    assert result.exit_code == 0, result.output
    assert f"failed: x: {images / 'x.jpg'}: not a readable image" in result.output and "BytesIO" not in result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["failures"] == {"x": f"{images / 'x.jpg'}: not a readable image (JPEG, PNG or WebP expected)"}

    for i in range(2):
        (images / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    result = runner.invoke(
        app, ["index", "build", str(tmp_path / "index2"), "--images", str(images), "--backbone", "tiny"]
    )
    assert result.exit_code == 2, result.output
    assert "3 of 8 catalog images failed (more than the allowed 20%); first: bad0: " in result.output
    assert not (tmp_path / "index2" / "index.json").exists()
