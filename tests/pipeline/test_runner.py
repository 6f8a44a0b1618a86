"""Pieces of the recipe runner (pipeline/runner.py) without a whole run: the catalog protocol's
gallery. The clothing catalog is read from ../shared (a small slice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    splits = {s: json.loads((clothing_dir / "image_splits" / f"split.clothing.{s}.json").read_text())[:n]
              for s, n in SLICE.items()}
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
