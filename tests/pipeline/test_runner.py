"""Pieces of the recipe runner (pipeline/runner.py) without a whole run: the catalog protocol's
gallery and the key that decides whether a stage trains again. The clothing catalog is read from
../shared (a small slice); training is replaced by a stub that shifts the start model's text weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fashion_cir.training
from fashion_cir.models.cir import load_model
from fashion_cir.pipeline.recipe import load_recipe
from fashion_cir.pipeline.runner import Runner

REPO = Path(__file__).resolve().parents[2]
SLICE = {"train": 30, "val": 20, "test": 10}


def demo_runner(out: Path, *overrides: str) -> Runner:
    """The demo recipe on a slice of the clothing catalog, its catalog read, nothing generated."""
    sliced = [f"catalog.slice.{split}={n}" for split, n in SLICE.items()]
    runner = Runner(load_recipe(REPO / "configs" / "demo_clothing.json", None, [f"out={out}", *sliced, *overrides]))
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
