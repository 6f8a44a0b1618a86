"""Recipes as typed files: profiles and KEY=VALUE overrides (list items by index), checks across
fields, and one-line errors naming the file, the field and the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fashion_cir.errors import DataError
from fashion_cir.pipeline.recipe import load_recipe, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_recipes_load_with_their_profiles():
    demo = load_recipe(REPO / "configs" / "demo_clothing.json")
    fast = load_recipe(REPO / "configs" / "demo_clothing.json", "fast")
    full = load_recipe(REPO / "configs" / "demo_clothing.json", "full")
    assert [s.name for s in demo.stages] == ["stage1", "stage2"]
    assert [s.name for s in full.stages] == [
        "stage1",
        "stage2",
        "stage1-annotated-only",
        "stage1-annotated-and-generated",
    ]
    assert [s.refit_fusion for s in full.stages] == [True, True, False, False]
    assert demo.catalog.slice is None and fast.catalog.slice == {"train": 600, "val": 200, "test": 0}
    assert demo.stages[1].train_config().batch_size == 128 and fast.stages[1].train_config().batch_size == 32
    assert fast.stages[1].train_config().temperature == demo.stages[1].train_config().temperature == 0.02
    for recipe in (demo, fast, full):  # the shared stage settings and the recipe's seed reach every stage
        for stage in recipe.stages:
            config = stage.train_config()
            assert (config.encoders, config.last_n_blocks, config.epochs, config.seed) == ("text", 2, 1, 0), stage.name
    assert demo.model.attributes and [b.fused for b in demo.baselines] == [False, True] and demo.evaluation.reliance
    paper = load_recipe(REPO / "configs" / "fashioniq_vitb32.json")
    assert paper.towers.backbone == "openclip:ViT-B-32:openai" and paper.stages[0].train_config().encoders == "both"
    assert load_recipe(REPO / "configs" / "fashioniq_vitb32.json", "tiny").towers.backbone == "tiny"


def test_overrides_reach_nested_fields_and_list_items():
    assert parse_override("stages.0.config.epochs=3") == {"stages": {"0": {"config": {"epochs": 3}}}}
    assert parse_override("out=runs/x") == {"out": "runs/x"}
    assert parse_override('evaluation.protocols=["split"]') == {"evaluation": {"protocols": ["split"]}}
    recipe = load_recipe(
        REPO / "configs" / "demo_clothing.json",
        "fast",
        ["stages.1.config.lr=0.001", "out=elsewhere", "catalog.slice.val=50"],
    )
    assert recipe.stages[1].train_config().lr == 0.001 and recipe.stages[0].train_config().lr == 3e-5
    assert recipe.out == "elsewhere" and recipe.catalog.slice == {"train": 600, "val": 50, "test": 0}
    with pytest.raises(DataError, match="not KEY=VALUE"):
        parse_override("epochs")


def test_stage_defaults_and_the_recipe_seed_fill_what_a_step_leaves_unset(tmp_path):
    raw = json.loads((REPO / "configs" / "demo_clothing.json").read_text())
    raw["seed"] = 7
    raw["stage_defaults"] = {**raw["stage_defaults"], "lr": 0.5}
    raw["stages"][1]["config"]["seed"] = 3  # a stage's own setting wins over the defaults and the recipe's seed
    raw["towers"]["align"] = {"epochs": 2}
    recipe = load_recipe(write(tmp_path, **raw))
    first, second = (s.train_config() for s in recipe.stages)
    assert (first.seed, first.lr, first.batch_size) == (7, 3e-5, 64)  # the stage's lr, the defaults' absent
    assert (second.seed, second.lr, second.epochs) == (3, 2e-5, 1)
    assert recipe.generate["train"].seed == 7 and recipe.towers.align.seed == 7
    raw["stages"][0]["config"].pop("lr")
    assert (
        load_recipe(write(tmp_path, **raw)).stages[0].train_config().lr == 0.5
    )  # a default where the stage names none


def write(tmp_path: Path, **change) -> Path:
    raw = json.loads((REPO / "configs" / "demo_clothing.json").read_text())
    raw.update(change)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        ({"towers": {"backbone": "offline", "align": {"epochs": "many"}}}, ["towers.align.epochs", "'many'"]),
        ({"stages": [{"name": "s", "kind": "stage3", "start": "zero-shot"}]}, ["stages.0.kind", "'stage3'"]),
        ({"stages": [{"name": "s", "kind": "stage1", "start": "nobody"}]}, ["starts from 'nobody'"]),
        (
            {"stages": [{"name": "s", "kind": "stage2", "start": "zero-shot", "config": {"temperature": -1}}]},
            ["stage 's' config", "temperature", "-1"],
        ),
        ({"generate": {}}, ["generated triplets"]),
        ({"evaluation": {"compare": [["stage1", "stage7"]]}}, ["unknown model 'stage7'"]),
        ({"colour": True}, ["colour", "Extra inputs are not permitted"]),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_field(tmp_path, change, words):
    with pytest.raises(DataError) as error:
        load_recipe(write(tmp_path, **change))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "recipe.json") in message
    for word in words:
        assert word in message, (word, message)
