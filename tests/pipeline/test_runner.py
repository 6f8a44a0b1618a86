"""The recipe runner (pipeline/runner.py) in-process, step by step and in one small run: the
catalog and its protocols, run.json, timings, scored rows and the results tables, generated
triplets and fitted fusions reused by content, the baseline's selection, and the key that decides
whether a stage trains again. The clothing catalog is read from ../shared (a small slice) with the
tiny towers; stage training is replaced by a stub that shifts the start model's text weights."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fashion_cir.training
from fashion_cir.errors import DataError
from fashion_cir.evaluation.stats import paired_difference, recall_interval
from fashion_cir.models.cir import CIRModel, load_model
from fashion_cir.pipeline import runner as runner_module
from fashion_cir.pipeline.recipe import TripletSource, load_recipe
from fashion_cir.pipeline.runner import Runner
from fashion_cir.retrieval import open_index

REPO = Path(__file__).resolve().parents[2]
SLICE = {"train": 30, "val": 20, "test": 10}


def demo_recipe(*overrides: str):
    """The demo recipe (configs/demo_clothing.json) with ``key=value`` overrides."""
    return load_recipe(REPO / "configs" / "demo_clothing.json", None, list(overrides))


def demo_runner(out: Path, *overrides: str) -> Runner:
    """The demo recipe on a slice of the clothing catalog, its catalog read, nothing generated."""
    sliced = [f"catalog.slice.{split}={n}" for split, n in SLICE.items()]
    runner = Runner(demo_recipe(f"out={out}", *sliced, *overrides))
    runner.catalog_ = runner.catalog()
    runner.generated = {}
    return runner


@pytest.fixture()
def in_repo(monkeypatch, clothing_dir):
    monkeypatch.chdir(REPO)  # the demo recipe's paths are relative to the repository


def test_the_catalog_protocol_ranks_every_split(in_repo, clothing_dir, tmp_path):
    """Issue 24 item 5: the catalog protocol's gallery is the whole (sliced) catalog, every split,
    as the service searches it; the split protocol keeps each set's val gallery."""
    runner = demo_runner(tmp_path / "run")
    splits = {
        s: json.loads((clothing_dir / "image_splits" / f"split.clothing.{s}.json").read_text())[:n]
        for s, n in SLICE.items()
    }
    on_disk = {p.stem for p in (clothing_dir / "images").glob("*.jpg")}
    expected = [i for s in ("train", "val", "test") for i in splits[s] if i in on_disk]
    assert len(expected) == sum(SLICE.values())  # every sliced id has its photo
    evaluator = runner.evaluator()
    protocols = {p.name: p for p in evaluator.protocols}
    assert set(protocols) == {"split", "catalog"}
    catalog = protocols["catalog"]
    assert list(catalog.gallery_ids) == expected and catalog.remove_reference
    assert set(splits["train"]) | set(splits["test"]) <= set(catalog.gallery_ids)
    assert protocols["split"].gallery_ids is None and not protocols["split"].remove_reference
    for name, triplet_set in evaluator.sets.items():
        assert triplet_set.gallery_ids == splits["val"], name


def test_the_evaluator_scores_generated_val_triplets_when_asked(in_repo, tmp_path):
    """The evaluator's wiring (K values, kept ranks, no progress bars, the catalog's attributes, the
    recipe's selection, results under evaluations/) and the generated val set: only triplets whose
    photos the catalog has, searched in the val split."""
    from fashion_cir.pipeline.runner import GENERATED_VAL, KS

    runner = demo_runner(tmp_path / "run", "evaluation.generated_val=true")
    evaluator = runner.evaluator()
    assert GENERATED_VAL not in evaluator.sets  # asked for, but nothing generated
    assert (evaluator.options.ks, evaluator.options.progress, evaluator.options.keep_ranks) == (KS, False, True)
    assert evaluator.records is runner.catalog_.attributes and evaluator.results_dir == tmp_path / "run" / "evaluations"
    assert evaluator.selection == runner.recipe.evaluation.selection
    val = runner.catalog_.splits["val"]
    runner.generated = {
        "val": [
            {"candidate": val[0], "target": val[1], "captions": ["is red", "red"]},
            {"candidate": "unknown", "target": val[1], "captions": ["is blue", "blue"]},
            {"candidate": val[2], "target": "unknown", "captions": ["is green", "green"]},
            {"candidate": val[3], "target": val[4], "captions": ["is long", "long"]},
        ]
    }
    generated = runner.evaluator().sets[GENERATED_VAL]
    assert generated.name == GENERATED_VAL
    assert [(t.candidate, t.target, t.captions) for t in generated.triplets] == [
        (val[0], val[1], ("is red", "red")),
        (val[3], val[4], ("is long", "long")),
    ]
    assert generated.gallery_ids == val and generated.image_paths == runner.catalog_.image_paths
    assert (generated.missing_images, generated.skipped_triplets) == ([], 0)
    plain = demo_runner(tmp_path / "other")
    plain.generated = runner.generated
    assert GENERATED_VAL not in plain.evaluator().sets  # generated, not asked for


def fake_train(config, model, triplets, paths, evaluator, records, run_dir):
    """A training stub: the start model's text projection shifted by the stage's learning rate (the
    image encoder stays as it is, like the recipes' text-only training)."""
    with torch.no_grad():
        model.backbone.clip.text_projection.add_(config.lr)
    model.mark_trained(["backbone.clip.text_projection"])
    model.save(Path(run_dir) / "model", {"stage": "fake"})


def test_a_changed_start_model_trains_the_next_stage_again(in_repo, tmp_path, monkeypatch, capsys):
    """Issue 24 item 6: stage 2's retrain key holds its start model's content, not its folder:
    training stage 1 again (a new learning rate) retrains stage 2 from the same
    folder, and an unchanged re-run retrains neither."""
    monkeypatch.setattr(fashion_cir.training, "train_stage", fake_train)
    monkeypatch.setattr("fashion_cir.pipeline.pictures.stage_curves", lambda files, out: out)
    out = tmp_path / "run"
    zero = load_model(backbone="tiny").save(out / "zero-shot")
    fixed = ["stages.0.refit_fusion=false", "stages.1.refit_fusion=false"]  # no fusion fit (no evaluation)

    def run_stages(*overrides: str) -> tuple[str, dict]:
        runner = demo_runner(out, *fixed, *overrides)
        runner.evaluator_ = None
        stage1, stage2 = runner.recipe.stages
        capsys.readouterr()
        published = runner.train_stage(stage1, zero)
        assert published == out / "stage1"
        runner.train_stage(stage2, published)
        inputs = json.loads((out / "train" / "stage2" / "inputs.json").read_text())
        return capsys.readouterr().out, inputs

    _, first = run_stages()
    log, again = run_stages()
    assert "training it again" not in log and again == first
    log, changed = run_stages("stages.0.config.lr=0.001")
    assert "stage1: its start model, triplets or settings changed; training it again" in log
    assert "stage2: its start model, triplets or settings changed; training it again" in log
    assert changed["start"] != first["start"] and {k: v for k, v in changed.items() if k != "start"} == {
        k: v for k, v in first.items() if k != "start"
    }


class Clock:
    """A stand-in for the runner's ``time`` module: perf_counter reads ``now``."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_steps_are_logged_timed_and_written(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(runner_module, "time", clock)
    monkeypatch.setattr(runner_module, "peak_rss_mb", lambda: 1234.4)
    runner = Runner(demo_recipe(f"out={tmp_path}"))
    clock.now += 3.0
    with runner.step("catalog"):
        clock.now += 12.34
    clock.now += 0.5
    with runner.step("image features and towers"):
        clock.now += 100.06
    assert runner.timings == [
        {"step": "catalog", "seconds": 12.3, "peak_rss_mb": 1234},
        {"step": "image features and towers", "seconds": 100.1, "peak_rss_mb": 1234},
    ]
    assert capsys.readouterr().out.splitlines() == [
        "[     3s] catalog ...",
        "[    15s] catalog: 12 s",
        "[    16s] image features and towers ...",
        "[   116s] image features and towers: 100 s",
    ]
    runner.write_timings()
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "steps": runner.timings,
        "total_seconds": 115.9,
        "peak_rss_mb": 1234,
    }
    assert capsys.readouterr().out == (
        "\nTime per step:\n"
        f"  {'catalog':<40}{12:>8} s\n"
        f"  {'image features and towers':<40}{100:>8} s\n"
        f"  {'total':<40}{116:>8} s  (peak RSS 1234 MB; timings.json)\n"
    )
    monkeypatch.setenv("RANK", "1")
    other = Runner(demo_recipe(f"out={tmp_path}"))
    other.log("only rank 0 speaks")
    assert not other.is_main and capsys.readouterr().out == ""


def test_run_json_records_every_input_file_the_versions_and_the_commit(in_repo, clothing_dir, tmp_path):
    runner = Runner(demo_recipe(f"out={tmp_path}"), source="demo.json")
    runner.record_run()
    run = json.loads((tmp_path / "run.json").read_text())
    shared = "../shared/datasets/clothing-dataset/"
    files = [
        *(f"image_splits/split.clothing.{s}.json" for s in ("train", "val", "test")),
        "attributes.jsonl",
        "images.csv",
        *(f"captions/cap.clothing.{s}{kind}.json" for s in ("train", "val") for kind in ("", ".relative", ".minpairs")),
    ]
    assert run["inputs"] == {shared + f: hashlib.sha1((clothing_dir / f).read_bytes()).hexdigest() for f in files}
    assert run["source"] == "demo.json" and run["recipe"] == runner.recipe.model_dump(mode="json")
    assert run["versions"]["python"].split()[0] == platform.python_version()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip()  # None outside a checkout (a copy of the tree, as mutmut's)
    assert run["git_commit"] in ((commit, commit + "-dirty") if head.returncode == 0 else (None,))
    missing = Runner(demo_recipe(f"out={tmp_path}", "catalog.labels=nowhere.csv"))
    missing.record_run()
    assert "nowhere.csv" not in json.loads((tmp_path / "run.json").read_text())["inputs"]


def test_a_catalog_without_its_images_folder_is_named(in_repo, tmp_path):
    runner = Runner(demo_recipe(f"out={tmp_path}", f"catalog.images={tmp_path / 'none'}"))
    with pytest.raises(DataError, match=f"^recipe catalog.images: {tmp_path / 'none'} is not a folder of images$"):
        runner.catalog()


def test_labels_and_attributes_are_read_for_the_sliced_catalog(in_repo, clothing_dir, tmp_path):
    catalog = demo_runner(tmp_path / "run").catalog_
    first = catalog.splits["train"][0]
    row = next(line for line in (clothing_dir / "images.csv").read_text().splitlines() if line.startswith(first))
    assert catalog.labels[first] in row.split(",")
    assert (
        catalog.attributes[first]["image"] == first
        and catalog.attributes_file.resolve() == clothing_dir / "attributes.jsonl"
    )
    assert [len(catalog.splits[s]) for s in ("train", "val", "test")] == [SLICE[s] for s in ("train", "val", "test")]


def test_random_rows_are_k_over_the_gallery(in_repo, tmp_path):
    runner = demo_runner(tmp_path / "run")
    runner.evaluator_ = runner.evaluator()
    runner.random_rows()
    sets = ["annotated-val", "relative-val", "minpairs-val"]
    split_gallery, catalog_gallery = SLICE["val"], sum(SLICE.values()) - 1  # the reference left out
    expected = [
        ("split", split_gallery, {1: 5.0, 5: 25.0, 10: 50.0, 50: 100.0}),
        ("catalog", catalog_gallery, {k: 100.0 * k / catalog_gallery for k in (1, 5, 10)} | {50: 5000 / 59}),
    ]
    rows = [(r["protocol"], r["set"], r["n_gallery"], {k: r[f"R@{k}"] for k in (1, 5, 10, 50)}) for r in runner.rows]
    assert rows == [(p, s, g, recalls) for p, g, recalls in expected for s in sets]
    assert all(r["stage"] == "random" and r["mode"] == "-" and r["n_queries"] == 0 for r in runner.rows)


def scored_runner(out: Path) -> Runner:
    """The slice with 60 val images (two queries per val set), towers that need no download."""
    runner = demo_runner(out, "catalog.slice.val=60", "towers.backbone=tiny", "towers.align=null")
    runner.evaluator_ = runner.evaluator()
    return runner


def test_scored_rows_follow_the_ranks_and_the_tables_read_them(in_repo, tmp_path):
    runner = scored_runner(tmp_path / "run")
    model = load_model(backbone="tiny")
    runner.score("zero-shot", model, ("image", "sum"))
    assert [(r["protocol"], r["set"], r["mode"]) for r in runner.rows] == [
        (p, s, m)
        for p in ("split", "catalog")
        for m in ("image", "sum")
        for s in ("annotated-val", "relative-val", "minpairs-val")
    ]
    for row in runner.rows:
        key = f"zero-shot/{row['mode']}|{row['protocol']}|{row['set']}"
        ranks, shuffled = runner.ranks[key], runner.ranks[key + "|shuffled"]
        assert row["n_queries"] == len(ranks) == 2 and row["n_gallery"] == (60 if row["protocol"] == "split" else 100)
        assert [row[f"R@{k}"] for k in (1, 5, 10, 50)] == [100.0 * np.mean(np.array(ranks) < k) for k in (1, 5, 10, 50)]
        assert row["R@10_ci"] == recall_interval(ranks, 10)[1:] and row["R@50_ci"] == (recall_interval(ranks, 50)[1:])
        assert [row["reliance"], *row["reliance_ci"]] == list(paired_difference(ranks, shuffled, 10))
    assert len({r["R@50"] for r in runner.rows}) > 1 and any(r["reliance"] for r in runner.rows)  # not vacuous
    assert runner.selection_figure(model, "sum") == runner.evaluator_.figure(runner.evaluator_(model, ("sum",)), "sum")
    plain = scored_runner(tmp_path / "plain")  # its own evaluations (the cache keeps shuffled ranks once scored)
    plain.score("other", model, ("sum",), reliance=False)
    assert "reliance" not in plain.rows[-1] and not any(k.endswith("shuffled") for k in plain.ranks)
    runner.rows.append(plain.rows[-1])
    table = runner.table().splitlines()
    assert table[0] == (
        "| model | mode | protocol | set | R@1 | R@5 | R@10 | R@50 | R@10 95% CI | R@50 95% CI "
        "| reliance (R@10 true - shuffled, 95% CI) | queries | gallery |"
    )
    assert table[1] == "|" + "---|" * 13
    first = next(r for r in runner.rows if r["protocol"] == "split" and r["set"] == "annotated-val")
    assert table[2] == (
        f"| zero-shot | image | split | annotated-val | {first['R@1']:.2f} | {first['R@5']:.2f} | {first['R@10']:.2f} | "
        f"{first['R@50']:.2f} | {first['R@10_ci'][0]:.1f}-{first['R@10_ci'][1]:.1f} | "
        f"{first['R@50_ci'][0]:.1f}-{first['R@50_ci'][1]:.1f} | {first['reliance']:+.1f} "
        f"({first['reliance_ci'][0]:+.1f} to {first['reliance_ci'][1]:+.1f}) | 2 | 60 |"
    )
    order = [(line.split(" | ")[2], line.split(" | ")[3]) for line in table[2:]]
    assert order == sorted(
        order,
        key=lambda ps: (
            ["split", "catalog"].index(ps[0]),
            ["annotated-val", "relative-val", "minpairs-val"].index(ps[1]),
        ),
    )
    assert table[-1].endswith("| - | 2 | 100 |")  # a row scored without reliance
    runner.rows.append({k: v for k, v in first.items() if k not in ("R@10_ci", "R@50_ci")} | {"stage": "no intervals"})
    line = next(line for line in runner.table().splitlines() if line.startswith("| no intervals |"))
    low, high = first["reliance_ci"]
    assert line.endswith(
        f"| {first['R@50']:.2f} | - | - | {first['reliance']:+.1f} ({low:+.1f} to {high:+.1f}) | 2 | 60 |"
    )


def test_differences_pair_the_same_queries_per_protocol_and_set(in_repo, tmp_path):
    runner = scored_runner(tmp_path / "run")
    a, b = [0, 10], [50, 3]  # ranks 10 and 50: just outside R@10 and R@50
    runner.ranks = {
        "x/sum|split|annotated-val": a,
        "y/sum|split|annotated-val": b,
        "x/sum|catalog|minpairs-val": b,
        "y/sum|catalog|minpairs-val": a,
        "x/sum|catalog|relative-val": a,  # y has no ranks here: no line
    }
    lines = runner.differences([("x/sum", "y/sum")]).splitlines()
    assert lines[:2] == [
        "| comparison | protocol | set | R@10 diff (95% CI) | R@50 diff (95% CI) |",
        "|---|---|---|---|---|",
    ]

    def cells(first, second):
        return " | ".join("{:+.1f} ({:+.1f} to {:+.1f})".format(*paired_difference(first, second, k)) for k in (10, 50))

    assert lines[2:] == [
        f"| x/sum - y/sum | split | annotated-val | {cells(a, b)} |",
        f"| x/sum - y/sum | catalog | minpairs-val | {cells(b, a)} |",
    ]
    assert cells(a, b).startswith("+0.0 (") and cells(b, a).startswith("+0.0 (")  # R@10: one found in each
    assert " | +50.0 (" in cells(a, b)  # R@50: both of a's, one of b's


def test_git_commit_names_the_checkout_and_its_uncommitted_changes(tmp_path, monkeypatch):
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert runner_module.git_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    assert runner_module.git_commit(tmp_path) == git("rev-parse", "HEAD") + "-dirty"  # staged, not committed
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD")
    (tmp_path / "new.txt").write_text("untracked")
    assert runner_module.git_commit(tmp_path) == head  # untracked files are not changes to the code
    (tmp_path / "a.txt").write_text("b")
    assert runner_module.git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert runner_module.git_commit(tmp_path) is None


def test_stage_triplets_are_training_pairs_only(in_repo, tmp_path):
    out = tmp_path / "run"
    runner = demo_runner(out, *own_captions(demo_runner(out), tmp_path / "captions"))
    train, val = runner.catalog_.splits["train"], runner.catalog_.splits["val"]
    runner.generated = {
        "train": [
            {"candidate": train[10], "target": train[11], "captions": ["is red", "red"]},
            {"candidate": train[12], "target": val[0], "captions": ["is blue", "blue"]},
        ]
    }
    own = [(train[i], train[i + 1]) for i in range(6)]

    def pairs(data: list[str]) -> list[tuple[str, str]]:
        stage = runner.recipe.stages[0].model_copy(update={"data": data})
        return [(t.candidate, t.target) for t in runner.stage_triplets(stage)]

    assert pairs(["generated"]) == [(train[10], train[11])]
    assert pairs(["annotated"]) == own
    assert pairs(["annotated", "generated"]) == [*own, (train[10], train[11])]
    runner.recipe.generated = list(runner.recipe.annotated)  # generated triplets from files come before the run's own
    assert pairs(["generated"]) == [*own, (train[10], train[11])]
    assert pairs(["annotated", "generated"]) == [*own, *own, (train[10], train[11])]
    runner.recipe.annotated = [*runner.recipe.annotated, *runner.recipe.annotated]  # every source counts
    assert pairs(["annotated"]) == [*own, *own]
    assert pairs([]) == []


def test_new_models_read_items_as_the_recipe_says(in_repo, tmp_path):
    runner = demo_runner(tmp_path / "run")
    tiny = load_model(backbone="tiny").backbone
    plain = runner.new_model(tiny, "caption", reads_items=False)
    assert (plain.matcher, plain.attribute_space, plain.text_template, plain.query_mode) == (
        None,
        None,
        "caption",
        "sum",
    )
    assert plain.descriptions_source == str((runner.catalog_.attributes_file).resolve())
    with pytest.raises(
        DataError, match="recipe model.matcher.spec 'backbone' shares the offline towers' text tower; tiny"
    ):
        runner.new_model(tiny, "prompt", reads_items=True)
    combined = demo_runner(tmp_path / "run", "model.combiner=true", "model.matcher=null")
    model = combined.new_model(tiny, "prompt", reads_items=True)
    assert model.combiner is not None and model.matcher is None and model.attribute_space is not None
    no_attributes = demo_runner(tmp_path / "run", "model.matcher=null", "model.attributes=false")
    assert no_attributes.new_model(tiny, "prompt", reads_items=True).attribute_space is None


def test_a_backbone_matcher_shares_the_offline_towers_text_tower(in_repo, tmp_path):
    from fashion_cir.models.factory import create_backbone

    offline = create_backbone("offline")
    shared = demo_runner(tmp_path / "run").new_model(offline, "prompt", reads_items=True)
    assert shared.matcher.shared and shared.matcher.query_encoder is offline.text_tower
    assert shared.matcher.spec == offline.towers.text and shared.matcher in shared.modules()
    named = demo_runner(tmp_path / "run", 'model.matcher={"spec": "minilm"}').new_model(offline, "prompt", True)
    assert not named.matcher.shared and named.matcher.spec == "minilm" and named.matcher.query_encoder is not None
    assert named.matcher.query_encoder is not offline.text_tower


def test_generated_triplets_are_reused_while_their_inputs_stay_the_same(in_repo, tmp_path, monkeypatch):
    runner = scored_runner(tmp_path / "run")
    plain = load_model(backbone="tiny")
    first = runner.generated_triplets(plain, runner.catalog_, "train")
    train = set(runner.catalog_.splits["train"])
    assert first and all(t["candidate"] in train and t["target"] in train for t in first)
    stats = json.loads((tmp_path / "run" / "triplets" / "train.stats.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("fashion_cir.triplets.generate_triplets", refuse)
    assert runner.generated_triplets(plain, runner.catalog_, "train") == first
    with pytest.raises(AssertionError, match="generated again"):  # other image features: generated again
        runner.generated_triplets(load_model(backbone="tiny:1"), runner.catalog_, "train")
    changed = scored_runner(tmp_path / "run")
    changed.recipe.generate["train"] = changed.recipe.generate["train"].model_copy(update={"change_only_share": 1.0})
    with pytest.raises(AssertionError, match="generated again"):  # new settings: generated again
        changed.generated_triplets(plain, changed.catalog_, "train")
    described = scored_runner(tmp_path / "run")
    first_id = described.catalog_.splits["train"][0]
    described.catalog_.attributes[first_id] = {**described.catalog_.attributes[first_id], "description": "new words"}
    with pytest.raises(AssertionError, match="generated again"):  # a changed description: generated again
        described.generated_triplets(plain, described.catalog_, "train")
    bare = scored_runner(tmp_path / "bare")
    bare.catalog_.attributes_file = None
    with pytest.raises(
        DataError, match="^recipe 'generate' needs the catalog's MLLM attributes: set catalog.attributes"
    ):
        bare.generated_triplets(plain, bare.catalog_, "train")
    assert (
        stats["inputs_sha1"]
        == json.loads((tmp_path / "run" / "triplets" / "train.stats.json").read_text())["inputs_sha1"]
    )
    triplets_file = tmp_path / "run" / "triplets" / "train.json"
    triplets_file.write_text("[")
    with pytest.raises(DataError, match=f"malformed generated triplets {triplets_file}"):
        runner.generated_triplets(plain, runner.catalog_, "train")
    triplets_file.with_suffix(".stats.json").write_text("{")
    with pytest.raises(DataError, match="malformed triplet stats"):
        runner.generated_triplets(plain, runner.catalog_, "train")


def own_captions(runner: Runner, folder: Path) -> list[str]:
    """Six annotated training pairs among the slice's train images, as a recipe source override."""
    train = runner.catalog_.splits["train"]
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        {"candidate": train[i], "target": train[i + 1], "captions": ["is darker", "has a print"]} for i in range(6)
    ]
    (folder / "cap.json").write_text(json.dumps(pairs))
    (folder / "split.json").write_text(json.dumps(train))
    source = {"captions": str(folder / "cap.json"), "split": str(folder / "split.json"), "name": "own-train"}
    return [f"annotated={json.dumps([source])}"]


def test_fusion_weights_are_fitted_once_per_model_and_captions(in_repo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    overrides = own_captions(demo_runner(out), tmp_path / "captions")
    runner = demo_runner(out, "towers.backbone=tiny", "towers.align=null", *overrides)
    model = runner.new_model(load_model(backbone="tiny").backbone, "prompt", reads_items=False)
    runner.fit_fusion(model)
    files = list((out / "fusion").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["fusion"] == model.fusion.model_dump(mode="json")
    saved = json.loads(files[0].read_text())
    assert saved["queries"] == 6 and "fusion fitted on 6 training captions" in capsys.readouterr().out
    monkeypatch.setattr("fashion_cir.training.fusion.fit_fusion", lambda *a, **k: pytest.fail("fitted again"))
    again = runner.new_model(load_model(backbone="tiny").backbone, "prompt", reads_items=False)
    runner.fit_fusion(again)
    assert again.fusion == model.fusion and capsys.readouterr().out == ""
    unknown = demo_runner(out, "towers.backbone=tiny", "towers.align=null", *overrides, 'fusion.sets=["nothing"]')
    with pytest.raises(DataError, match="^recipe: a fused baseline needs annotated training captions to fit on$"):
        unknown.fit_fusion(again)


def test_a_baseline_publishes_its_best_variant_and_mode(in_repo, tmp_path):
    runner = scored_runner(tmp_path / "run")
    tiny = load_model(backbone="tiny").backbone
    spec = runner.recipe.baselines[0]  # zero-shot: prompt x (image, text, sum), caption x (text, sum)
    folder = runner.baseline(spec, tiny)
    figures = {}
    for variant in spec.variants:
        model = runner.new_model(tiny, variant.text_template, reads_items=False)
        for mode in variant.modes:
            figures[f"{variant.label}/{mode}"] = runner.evaluator_.figure(runner.evaluator_(model, (mode,)), mode)
    best = max(figures, key=figures.get)
    assert (
        len(set(figures.values())) > 1
        and runner.labels["zero-shot"] == best
        and folder == tmp_path / "run" / "zero-shot"
    )
    published = json.loads((folder / "model.json").read_text())
    assert published["query_mode"] == best.split("/")[1] and published["text_template"] == (
        "prompt" if best.startswith("zero-shot/") else "caption"
    )
    assert {(r["stage"], r["mode"]) for r in runner.rows} == {tuple(name.split("/")) for name in figures}


def test_a_baseline_hands_each_variant_its_settings(in_repo, tmp_path, monkeypatch, capsys):
    """What ``baseline`` asks of the runner (recorded around the real methods): a model reading items
    only for a matcher baseline, the fusion fitted only when fused, reliance measured only with a
    matcher, each mode's own selection figure; the published model names its baseline."""
    runner = scored_runner(tmp_path / "run")
    tiny = load_model(backbone="tiny").backbone
    calls = []
    for name in ("new_model", "fit_fusion", "score", "selection_figure"):
        real = getattr(runner, name)
        monkeypatch.setattr(
            runner,
            name,
            lambda *args, _real=real, _name=name, **kwargs: (
                calls.append((_name, args, kwargs)) or _real(*args, **kwargs)
            ),
        )
    monkeypatch.setattr(runner, "fit_fusion", lambda model: calls.append(("fit_fusion", (model,), {})))
    plain, fused = runner.recipe.baselines
    runner.baseline(plain, tiny)
    brief = {"new_model": lambda args: args[1:], "score": lambda args: (args[0], args[2])}  # no models
    assert [(c[0], brief[c[0]](c[1]), c[2]) for c in calls if c[0] != "selection_figure"] == [
        ("new_model", ("prompt", False), {}),
        ("score", ("zero-shot", ("image", "text", "sum")), {"reliance": False}),
        ("new_model", ("caption", False), {}),
        ("score", ("zero-shot-no-prompt", ("text", "sum")), {"reliance": False}),
    ]
    assert [c[1][1] for c in calls if c[0] == "selection_figure"] == ["image", "text", "sum", "text", "sum"]
    published = json.loads((tmp_path / "run" / "zero-shot" / "model.json").read_text())
    assert published["stage"] == "zero-shot"
    assert f"zero-shot: best variant {runner.labels['zero-shot']}" in capsys.readouterr().out
    calls.clear()
    monkeypatch.setattr(
        runner,
        "new_model",
        lambda backbone, template, reads_items: (
            calls.append(("new_model", (backbone, template, reads_items), {})) or load_model(backbone="tiny")
        ),
    )
    runner.baseline(fused, tiny)
    assert [c[0] for c in calls] == ["new_model", "fit_fusion", "score", "selection_figure"]
    assert calls[0][1][2] is True and calls[1][1][0] is calls[2][1][1]  # the fitted model is the one scored
    assert calls[2][2] == {"reliance": True}
    assert json.loads((tmp_path / "run" / "zero-shot-fused" / "model.json").read_text())["stage"] == "zero-shot-fused"


def test_a_small_run_end_to_end_in_process(in_repo, tmp_path, monkeypatch, capsys):
    """``Runner.run`` on the slice with one baseline and one stage (training stubbed): scores,
    selection, attribute heads, results, pictures and the index."""
    monkeypatch.setattr(fashion_cir.training, "train_stage", fake_train)
    monkeypatch.setattr("fashion_cir.pipeline.pictures.stage_curves", lambda files, image: image)  # no curves
    out = tmp_path / "runs" / "small"  # made with its parents
    demo = demo_recipe()
    first = demo.baselines[0].model_dump(mode="json")
    stage = demo.stages[0].model_dump(mode="json") | {"start": "zero-shot", "refit_fusion": False}
    runner = demo_runner(
        out,
        "catalog.slice.val=60",
        "towers.backbone=tiny",
        "towers.align=null",
        f"baselines={json.dumps([first])}",
        f"stages={json.dumps([stage])}",
        'evaluation.compare=[["stage1", "best-baseline"]]',
    )
    result = runner.run()
    steps = [t["step"] for t in runner.timings]
    assert steps == [
        "catalog",
        "image features and towers",
        "triplets",
        "baseline zero-shot",
        "train stage1",
        "score stage1",
        "select",
        "attribute heads",
        "pictures",
        "index",
    ]
    selected = json.loads((out / "best" / "selected.json").read_text())
    assert set(selected["scores"]) == {"zero-shot", "stage1"} and result["best"] == selected["stage"]
    assert selected["scores"] == {
        name: runner.selection_figure(CIRModel.load(out / name)) for name in ("zero-shot", "stage1")
    }
    assert selected["stage"] == max(selected["scores"], key=selected["scores"].get) and result["rows"] == runner.rows
    assert selected["selection"] == runner.recipe.evaluation.selection.model_dump(mode="json")
    best = CIRModel.load(out / "best")
    score = selected["scores"][selected["stage"]]
    assert f"best on val: {selected['stage']} (overall {score:.2f})" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["best"] == selected["stage"] and results["labels"] == runner.labels == {
        "zero-shot": runner.labels["zero-shot"],
        "stage1": "stage1/" + runner.labels["zero-shot"].split("/")[1],  # the mode it starts with
    }
    assert results["rows"] == json.loads(json.dumps(runner.rows)) and results["ranks"] == runner.ranks
    assert {r["stage"] for r in results["rows"]} == {
        "random",
        "zero-shot",
        "zero-shot-no-prompt",
        "stage1",
        "best-predicted-prompt",
    }
    assert best.attribute_heads is not None and (out / "attribute-heads").is_dir() and (out / "attributes.md").is_file()
    pairs = [(runner.labels["stage1"], runner.labels["zero-shot"])]
    differences = runner.differences(pairs)
    assert (
        out / "results.md"
    ).read_text() == runner.table() + "\n\nPaired differences (R@10, R@50):\n\n" + differences + "\n"
    assert len(differences.splitlines()) == 2 + 6  # both protocols x three val sets
    pictures = ["examples-annotated-val.png", "examples-relative-val.png", "examples-minpairs-val.png", "triplets.png"]
    assert all((out / name).stat().st_size > 0 for name in pictures)
    index = open_index(out / "index")
    assert sorted(index.ids) == sorted(runner.all_ids()) and len(index) == 100  # every split of the slice
    assert (out / "run.json").is_file() and (out / "timings.json").is_file()
    assert len(runner.generated["train"]) == len(json.loads((out / "triplets" / "train.json").read_text()))


def test_a_stage_trains_on_its_triplets_and_publishes_its_best_epoch(in_repo, tmp_path, monkeypatch, capsys):
    """What ``train_stage`` hands the trainer (batch fitted to a small set, the feature cache, the
    evaluator only when the fusion is not fitted again), what it publishes and what it records."""
    out = tmp_path / "run"
    overrides = [*own_captions(demo_runner(out), tmp_path / "captions"), "towers.backbone=tiny", "towers.align=null"]
    calls, curves = [], []

    def recording_train(config, model, triplets, paths, evaluator, records, run_dir):
        calls.append(dict(config=config, triplets=triplets, paths=paths, evaluator=evaluator, records=records))
        model.save(Path(run_dir) / "model", {"stage": "last epoch"})
        if config.lr > 0.001:
            model.save(Path(run_dir) / "best", {"stage": "best epoch"})

    monkeypatch.setattr(fashion_cir.training, "train_stage", recording_train)
    monkeypatch.setattr(
        "fashion_cir.pipeline.pictures.stage_curves", lambda files, image: curves.append((files, image))
    )
    zero = load_model(backbone="tiny").save(out / "zero-shot")
    runner = demo_runner(out, *overrides, 'stages.0.data=["annotated"]', "stages.0.config.lr=0.01")
    runner.evaluator_ = runner.evaluator()
    stage = runner.recipe.stages[0]
    assert runner.train_stage(stage, zero) == out / "stage1"
    [call] = calls
    triplets = runner.stage_triplets(stage)
    assert len(triplets) == 6 and call["triplets"] == triplets
    assert (call["config"].batch_size, call["config"].cache_dir, call["config"].progress) == (
        6,
        str(out / "features"),
        True,
    )
    assert call["paths"] == runner.catalog_.split_paths("train") and call["records"] is runner.catalog_.attributes
    assert call["evaluator"] is None  # the fusion is fitted again: no selection by the start model's fusion
    assert "stage1: 6 triplets, 1 epoch(s), batch 6" in capsys.readouterr().out
    published = json.loads((out / "stage1" / "model.json").read_text())
    assert (
        published["stage"] == "stage1"
        and published["fusion"] != json.loads((out / "zero-shot" / "model.json").read_text())["fusion"]
    )
    assert curves == [([out / "train" / "stage1" / "metrics.jsonl"], out / "train" / "stage1" / "curve.png")]
    assert runner.labels["stage1"] == "stage1/sum"
    inputs = json.loads((out / "train" / "stage1" / "inputs.json").read_text())
    assert set(inputs) == {"start", "triplets", "config", "selection"} and inputs[
        "selection"
    ] == runner.recipe.evaluation.selection.model_dump(mode="json")
    assert inputs["config"]["batch_size"] == 6 and inputs["config"]["lr"] == 0.01
    seven = demo_runner(
        out, *overrides, 'stages.0.data=["annotated"]', "stages.0.config.lr=0.01", "stages.0.refit_fusion=false"
    )
    seven.evaluator_ = seven.evaluator()
    first = seven.recipe.annotated[0]
    extra = seven.load_source(first, "train")
    monkeypatch.setattr(seven, "stage_triplets", lambda stage: [*triplets, extra.triplets[0]])
    seven.train_stage(seven.recipe.stages[0], zero)
    assert calls[-1]["config"].batch_size == 6 and calls[-1]["evaluator"] is seven.evaluator_  # 7 triplets: an even 6
    assert json.loads((out / "stage1" / "model.json").read_text())["stage"] == "best epoch"
    last = demo_runner(
        out, *overrides, 'stages.0.data=["annotated"]', "stages.0.config.lr=0.001", "stages.0.refit_fusion=false"
    )
    last.evaluator_ = None
    last.train_stage(last.recipe.stages[0], zero)
    assert json.loads((out / "stage1" / "model.json").read_text())["stage"] == "last epoch"  # no best/: the last
    (out / "train" / "stage1" / "inputs.json").write_text("{")
    with pytest.raises(DataError, match="stage inputs"):
        seven.train_stage(seven.recipe.stages[0], zero)


def test_towers_are_built_or_aligned_as_the_recipe_says(in_repo, tmp_path, monkeypatch, capsys):
    runner = demo_runner(tmp_path / "run", "towers.backbone=tiny", "towers.align=null", "towers.preprocess=targetpad")
    built = runner.towers(runner.catalog_)
    assert built.spec == "tiny:0" and built.preprocess_mode == "targetpad"
    calls = []
    tiny = load_model(backbone="tiny").backbone

    def recording_align(catalog, out, cache, config, progress, towers_spec):
        calls.append((catalog, out, cache, config, progress, towers_spec))
        return tiny, {"reused": len(calls) > 1, "best_val_image_to_text_R@10": 12.345}

    monkeypatch.setattr("fashion_cir.training.align.align_offline_backbone", recording_align)
    aligned = demo_runner(tmp_path / "run")
    capsys.readouterr()
    assert aligned.towers(aligned.catalog_) is tiny and aligned.towers(aligned.catalog_) is tiny
    spec = aligned.recipe.towers
    assert calls[0] == (
        aligned.catalog_,
        tmp_path / "run" / "offline-backbone",
        aligned.cache,
        spec.align,
        True,
        "offline+hsv",
    )
    assert [line.split("] ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "aligned the offline backbone (val image->text R@10 12.3)",
        "reusing the aligned offline backbone (val image->text R@10 12.3)",
    ]


def test_run_recipe_runs_a_runner_of_the_recipe(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(
        Runner, "run", lambda self: seen.append((self.recipe, self.source, self.serve, self.port)) or {"ran": 1}
    )
    recipe = demo_recipe(f"out={tmp_path}")
    assert runner_module.run_recipe(recipe, "a.json", serve=True, port=8123) == {"ran": 1}
    assert runner_module.run_recipe(recipe) == {"ran": 1}
    assert seen == [(recipe, "a.json", True, 8123), (recipe, "recipe", False, 8000)]


def test_the_runners_fusion_is_the_fit_on_its_training_gallery(in_repo, tmp_path):
    """The fusion ``fit_fusion`` fits, by a second route: the evaluator and fit called directly on
    the training split's gallery with the reference left out; a changed model or setting fits anew."""
    from fashion_cir.evaluation.evaluate import EvalOptions, Protocol
    from fashion_cir.evaluation.evaluator import Evaluator
    from fashion_cir.training.fusion import fit_fusion

    out = tmp_path / "run"
    captions = tmp_path / "captions"
    overrides = [*own_captions(demo_runner(out), captions), "towers.backbone=tiny", "towers.align=null"]
    train_ids = json.loads((captions / "split.json").read_text())
    (captions / "split.json").write_text(json.dumps(train_ids[:14]))  # the captions' own gallery: part of train
    runner = demo_runner(out, *overrides, "fusion.config.steps=7")
    model = runner.new_model(load_model(backbone="tiny").backbone, "prompt", reads_items=False)
    runner.fit_fusion(model)
    sets = {"own-train": runner.load_source(runner.recipe.annotated[0], "train")}

    def fitted(gallery, config=runner.recipe.fusion.config):
        train = Protocol("train", gallery, remove_reference=True)
        options = EvalOptions(progress=False)
        fitter = Evaluator(sets, runner.cache, runner.catalog_.attributes, options, None, None, [train])
        return fit_fusion(fitter.prepare(model, all_terms=True), "train", config)[0]

    expected = fitted(tuple(runner.catalog_.splits["train"]))
    assert model.fusion == expected and expected != fitted(None)  # the whole train split, not the captions' gallery
    default = type(runner.recipe.fusion.config)()
    assert expected != fitted(tuple(runner.catalog_.splits["train"]), default)  # the recipe's settings count
    other = runner.new_model(load_model(backbone="tiny:1").backbone, "prompt", reads_items=False)
    runner.fit_fusion(other)

    def unfitted() -> CIRModel:
        return runner.new_model(load_model(backbone="tiny").backbone, "prompt", reads_items=False)

    demo_runner(out, *overrides, "fusion.config.steps=8").fit_fusion(unfitted())
    assert len(list((out / "fusion").glob("*.json"))) == 3  # one per model and settings
    pairs = json.loads((captions / "cap.json").read_text())
    (captions / "cap.json").write_text(json.dumps([p | {"captions": ["is lighter", "is plain"]} for p in pairs]))
    demo_runner(out, *overrides, "fusion.config.steps=7").fit_fusion(unfitted())
    files = sorted((out / "fusion").glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 4  # other captions: fitted anew
    files[-1].write_text('{"fusion": {"composed": "heavy"}}')
    with pytest.raises(DataError, match=f"{files[-1]}.*composed"):  # a bad weight: the file is named
        demo_runner(out, *overrides, "fusion.config.steps=7").fit_fusion(unfitted())
    files[-1].write_text("{")
    with pytest.raises(DataError, match=f"malformed fitted fusion {files[-1]}"):
        demo_runner(out, *overrides, "fusion.config.steps=7").fit_fusion(unfitted())


def test_finish_selects_compares_writes_and_serves(in_repo, tmp_path, monkeypatch, capsys):
    """``finish`` with its model loading, index and server recorded: the best model on val, the best
    baseline standing in for ``best-baseline`` on either side of a comparison, comparisons of
    unscored models left out, the results written and printed, and the index served."""
    clock = Clock()
    monkeypatch.setattr(runner_module, "time", clock)
    monkeypatch.setattr(
        runner_module.CIRModel, "load", staticmethod(lambda folder: Path(folder))
    )  # a model = its folder
    served, indexed = [], []
    monkeypatch.setattr("fashion_cir.serving.app.serve", lambda *args, **kwargs: served.append((args, kwargs)))
    figures = {"zero-shot": 10.0, "zero-shot-fused": 30.0, "stage1": 40.0, "stage2": 20.0}
    compare = [["best-baseline", "stage1"], ["stage2", "stage1"], ["zero-shot", "best-baseline"]]
    out = tmp_path / "run"
    runner = Runner(
        demo_recipe(f"out={out}", "pictures=false", f"evaluation.compare={json.dumps(compare)}"), serve=True, port=8123
    )
    monkeypatch.setattr(runner, "selection_figure", lambda folder: figures[folder.name])
    monkeypatch.setattr(runner, "build_index", indexed.append)
    monkeypatch.setattr(runner, "table", lambda: "| the results table |")  # its own test reads it
    for name in figures:
        (out / name).mkdir(parents=True)
        (out / name / "weights").write_text(name)
    labels = {name: f"{name}/sum" for name in ("zero-shot", "zero-shot-fused", "stage1")}  # stage2 not scored
    ranks = {"zero-shot": [0, 40], "zero-shot-fused": [3, 12], "stage1": [60, 1]}
    runner.labels = labels
    runner.ranks = {f"{labels[name]}|split|annotated-val": r for name, r in ranks.items()}
    runner.rows = [{"stage": name, "mode": "sum"} for name in labels]
    runner.recipe.attribute_heads = False
    runner.evaluator_ = SimpleNamespace(protocols=[SimpleNamespace(name="split")], sets={"annotated-val": None})
    clock.now += 42.5

    result = runner.finish({name: out / name for name in figures})

    assert result == {"rows": runner.rows, "best": "stage1"}
    assert (out / "best" / "weights").read_text() == "stage1"
    assert json.loads((out / "best" / "selected.json").read_text()) == {
        "stage": "stage1",
        "scores": figures,
        "selection": runner.recipe.evaluation.selection.model_dump(mode="json"),
    }
    expected = runner.differences([("zero-shot-fused/sum", "stage1/sum"), ("zero-shot/sum", "zero-shot-fused/sum")])
    assert len(expected.splitlines()) == 4  # header, rule and the two comparisons that were scored
    table = "| the results table |"
    assert (out / "results.md").read_text() == table + "\n\nPaired differences (R@10, R@50):\n\n" + expected + "\n"
    results = json.loads((out / "results.json").read_text())
    assert results == {"rows": runner.rows, "best": "stage1", "labels": labels, "seconds": 42.5, "ranks": runner.ranks}
    printed = capsys.readouterr().out
    assert "\nResults (val):\n" + table + "\n\nPaired differences:\n" + expected + "\n" in printed
    assert "best on val: stage1 (overall 40.00)" in printed
    assert indexed == [runner.recipe.index] and [t["step"] for t in runner.timings] == ["select", "index"]
    assert "\nServing the catalog at http://127.0.0.1:8123/  (Ctrl+C to stop)\n" in printed
    assert served == [((out / "index", out / "best"), {"host": "127.0.0.1", "port": 8123})]
    assert json.loads((out / "timings.json").read_text())["total_seconds"] == 42.5

    alone = Runner(
        demo_recipe(f"out={out}", "pictures=false", "baselines=[]", "stages=[]", "evaluation.compare=[]", "index=null"),
        serve=True,
    )
    monkeypatch.setattr(alone, "selection_figure", lambda folder: figures[folder.name])
    monkeypatch.setattr(alone, "table", lambda: "| the results table |")
    alone.recipe.attribute_heads = False
    alone.evaluator_ = runner.evaluator_
    assert alone.finish({"stage2": out / "stage2"})["best"] == "stage2"  # no baselines: no best baseline
    assert len(served) == 1  # no index: nothing to serve


def test_attribute_heads_are_fitted_once_per_image_tower_and_labels(in_repo, tmp_path, monkeypatch, capsys):
    """The best model's heads: fitted, reported, scored with predicted descriptions; reused while the
    image tower and the train/val labels stay; fitted again when a train or a val label changes."""
    import fashion_cir.training.attribute_heads as heads_module
    from fashion_cir.models.attributes import load_heads

    out = tmp_path / "run"
    runner = demo_runner(out, "towers.backbone=tiny", "towers.align=null")
    load_model(backbone="tiny").save(out / "best")
    scored, fits = [], []
    monkeypatch.setattr(runner, "score", lambda *args, **kwargs: scored.append((args, kwargs)))
    fit = heads_module.fit_attribute_heads
    monkeypatch.setattr(heads_module, "fit_attribute_heads", lambda *args: fits.append(args) or fit(*args))

    def fitted_again() -> bool:
        before = len(fits)
        capsys.readouterr()
        runner.attribute_heads()
        return len(fits) > before

    assert fitted_again()
    heads = load_heads(out / "attribute-heads")
    val = heads.info["val"]
    mean, majority = (sum(r[key] for r in val.values()) / len(val) for key in ("accuracy", "majority_accuracy"))
    assert mean != majority
    assert (
        f"attribute heads (trained) on val: mean accuracy {mean:.1f}% (majority class {majority:.1f}%); "
        "table in attributes.md" in capsys.readouterr().out
    )
    assert (out / "attributes.md").read_text() == heads_module.format_report(heads) + "\n"
    assert CIRModel.load(out / "best").attribute_heads.info == heads.info
    [(args, kwargs)] = scored
    assert (args[0], args[2], kwargs) == ("best-predicted-prompt", (args[1].query_mode,), {"describe": "predicted"})
    assert args[1].attribute_heads is not None
    assert not fitted_again()
    assert (
        f"attribute heads (reused) on val: mean accuracy {mean:.1f}% (majority class {majority:.1f}%); "
        "table in attributes.md" in capsys.readouterr().out
    )
    for split in ("train", "val"):
        image = runner.catalog_.splits[split][0]
        runner.catalog_.attributes[image] = runner.catalog_.attributes[image] | {"color": "a new colour"}
        assert fitted_again(), split
        assert not fitted_again()
    load_model(backbone="tiny:1").save(out / "best")  # another image tower
    assert fitted_again() and not fitted_again()


def test_pictures_and_index_get_what_the_run_has(in_repo, tmp_path, monkeypatch, capsys):
    """What ``pictures`` and ``build_index`` hand their makers (recorded): every val set's examples
    with the catalog's attributes, the generated training triplets when there are any, the stages'
    curves when one was written; the index of the recipe's splits with each item's attributes
    (not its image path) and label."""
    import fashion_cir.pipeline.pictures as pictures_module
    import fashion_cir.retrieval.index as index_module

    out = tmp_path / "run"
    runner = scored_runner(out)
    load_model(backbone="tiny").save(out / "best")
    calls = []

    def recorder(name):
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or f"<{name}>"

    for name in ("example_picture", "triplet_picture", "stage_curves"):
        monkeypatch.setattr(pictures_module, name, recorder(name))
    monkeypatch.setattr(  # the index it returns: its items
        index_module, "build_index", lambda *args, **kwargs: calls.append(("build_index", args, kwargs)) or args[2]
    )
    runner.pictures()  # nothing generated, no curves
    examples = [c for c in calls if c[0] == "example_picture"]
    assert [c[1][1] for c in examples] == list(runner.evaluator_.sets.values()) and len(calls) == len(examples) == 3
    assert all(c[1][2] is runner.catalog_.attributes and c[1][3] is runner.cache for c in examples)
    assert [c[1][4] for c in examples] == [out / f"examples-{name}.png" for name in runner.evaluator_.sets]
    calls.clear()
    runner.generated = {"val": ["v"], "train": []}
    runner.pictures()
    assert [c[0] for c in calls] == ["example_picture"] * 3  # no generated training triplets: no picture
    calls.clear()
    runner.generated = {"train": ["t"]}
    curve = out / "train" / runner.recipe.stages[1].name / "metrics.jsonl"
    curve.parent.mkdir(parents=True)
    curve.write_text("{}\n")
    runner.pictures()
    assert calls[3:] == [
        ("triplet_picture", (["t"], runner.catalog_.image_paths, out / "triplets.png"), {}),
        (
            "stage_curves",
            ([out / "train" / s.name / "metrics.jsonl" for s in runner.recipe.stages], out / "training.png"),
            {},
        ),
    ]
    assert "training curves: <stage_curves>" in capsys.readouterr().out

    calls.clear()
    runner.catalog_.labels.pop(runner.catalog_.splits["test"][0])  # an item without a label
    bare = next(i for i in runner.catalog_.splits["test"][1:] if i in runner.catalog_.labels)
    runner.catalog_.attributes.pop(bare)  # and one without attributes
    spec = runner.recipe.index.model_copy(update={"splits": ["val", "test"], "factory": "Flat"})
    runner.build_index(spec)
    [(_, (folder, model, paths, metadata), kwargs)] = calls
    ids = runner.catalog_.splits["val"] + runner.catalog_.splits["test"]
    assert folder == out / "index" and isinstance(model, CIRModel) and list(paths) == ids
    assert paths == {i: runner.catalog_.image_paths[i] for i in ids}
    for i in ids:
        expected = {k: v for k, v in runner.catalog_.attributes.get(i, {}).items() if k != "image"}
        if i in runner.catalog_.labels:
            expected["label"] = runner.catalog_.labels[i]
        assert metadata[i] == expected
    assert "image" in runner.catalog_.attributes[ids[0]] and "label" in metadata[ids[0]]
    assert "label" not in metadata[runner.catalog_.splits["test"][0]]
    assert metadata[bare] == {"label": runner.catalog_.labels[bare]}
    assert f"index: {len(ids)} catalog images in {out / 'index'}" in capsys.readouterr().out
    assert kwargs == {
        "factory": "Flat",
        "cache_dir": out / "features",
        "overwrite": True,
        "progress": True,
    }


def test_without_an_attributes_file_the_catalog_is_captioned(in_repo, clothing_dir, tmp_path, monkeypatch, capsys):
    """The caption step (precomputed answers named through an environment variable): the sliced
    catalog's photos described, a split id without a photo and an image without an answer both
    reported, and a later run of the main process captioning again (its cache is per image) while
    another rank reads what the main one wrote."""
    splits = clothing_dir / "image_splits"
    test_ids = ["no-such-image", *json.loads((splits / "split.clothing.test.json").read_text())[:9]]
    (tmp_path / "test.json").write_text(json.dumps(test_ids))
    first_val = json.loads((splits / "split.clothing.val.json").read_text())[0]
    answers = [json.loads(line) for line in (clothing_dir / "attributes.jsonl").read_text().splitlines()]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers if a["image"] != first_val))
    monkeypatch.setenv("ANSWERS_DIR", str(tmp_path))
    out = tmp_path / "run"
    caption = {"backend": "precomputed", "model": "${ANSWERS_DIR}/answers.jsonl"}
    overrides = [
        f"out={out}",
        *(f"catalog.slice.{split}={n}" for split, n in SLICE.items()),
        "catalog.attributes=null",
        f"catalog.splits.test={json.dumps([str(tmp_path / 'test.json')])}",
        f"caption={json.dumps(caption)}",
    ]

    def catalog(rank: str = "0"):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        return Runner(demo_recipe(*overrides)).catalog()

    captioned = catalog()
    log = capsys.readouterr().out
    assert captioned.attributes_file == out / "attributes.jsonl"
    described = [i for ids in captioned.splits.values() for i in ids if i not in (first_val, "no-such-image")]
    assert len(described) == sum(SLICE.values()) - 2 and set(captioned.attributes) == set(described)
    by_image = {a["image"]: a for a in answers}
    assert all(captioned.attributes[i]["description"] == by_image[i]["description"] for i in described)
    assert f"captioning {sum(SLICE.values()) - 1} images with precomputed ${{ANSWERS_DIR}}/answers.jsonl" in log
    assert "captioning: 2 images without attributes (first: no-such-image: image file not found in " in log
    summary = next((out / "captions").glob("*.summary.json"))
    reason = json.loads(summary.read_text())["failures"][first_val]["error"]
    assert f"the list is in {summary}" in log and reason
    overrides.append("caption.max_failed_share=0.01")  # 2 of 60 is more than 1%
    with pytest.raises(DataError) as failed:
        catalog()
    assert str(failed.value) == (
        f"2 of {sum(SLICE.values())} images failed (more than the allowed 1%); first: no-such-image: image file "
        f"not found in {Path(demo_recipe().catalog.images)}; "
        f"{first_val}: {reason}"
    )
    overrides.pop()
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert catalog(rank="1").attributes == captioned.attributes  # another rank reads the main one's file
    assert first_val in catalog().attributes  # the main process captions again: the new answer is read


def test_a_catalog_may_come_without_attributes_or_labels(in_repo, tmp_path):
    runner = demo_runner(tmp_path / "run", "catalog.attributes=null", "catalog.labels=null")
    assert runner.recipe.caption is None  # nothing to caption with either
    assert (runner.catalog_.attributes_file, runner.catalog_.attributes, runner.catalog_.labels) == (None, {}, {})
    assert len(runner.all_ids()) == sum(SLICE.values())
    assert runner.new_model(load_model(backbone="tiny").backbone, "caption", False).descriptions_source is None


def test_a_source_without_a_name_is_named_by_its_caption_file():
    assert runner_module.source_name(TripletSource(captions="x/cap.dress.val.json", split="s.json")) == "cap.dress.val"
    assert runner_module.source_name(TripletSource(captions="x/c.json", split="s.json", name="mine")) == "mine"


def test_peak_rss_is_the_kernels_high_water_mark_in_mb():
    def high_water_kb() -> int:  # the same figure, read another way
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

    # the two are counted apart (the kernel's per-thread counters lag): the same within 5%, in MB
    assert runner_module.peak_rss_mb() == pytest.approx(high_water_kb() / 1024, rel=0.05)
