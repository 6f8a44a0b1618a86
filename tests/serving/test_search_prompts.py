"""Search with attribute heads over a real uvicorn server: an upload gets a predicted description
in its prompt, attribute filters and the same-type switch keep what they say with an honest k,
pages continue each other, "more like this" needs no text, results explain themselves; the CLI
`search` leaves a catalog reference out like the API does; every CLI option has help that fits
80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from fashion_cir.cli import app as cli_app
from fashion_cir.models.attributes import describe
from fashion_cir.serving.app import create_app
from support.serving import indexed_demo_catalog, running_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    catalog, model, index = indexed_demo_catalog(root)
    with running_server(create_app(index, model)) as url:
        yield url, catalog, model, root


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as http:
        yield http


def test_upload_gets_the_predicted_prompt(client, served):
    _, (paths, metadata), model, _ = served
    image_id = sorted(paths)[0]
    files = {"image": ("photo.jpg", paths[image_id].read_bytes(), "image/jpeg")}
    body = client.post("/search", data={"text": "is red with long sleeves", "k": 5}, files=files).json()
    predicted = body["reference_attributes"]
    assert set(predicted) >= {"category", "color", "pattern", "sleeves", "kids"}
    assert all(0 < entry["confidence"] <= 1 for entry in predicted.values())
    assert body["prompt"] == {"source": "predicted", "description": describe(predicted)}
    assert body["query_text"] == f"{describe(predicted)}, but is red with long sleeves"
    assert body["requested"] == {"color": "red", "sleeves": "long sleeves"}
    for item in body["results"]:
        assert set(item["match"]) == {"satisfied", "missed", "kept"}
        assert ("red" in item["match"]["satisfied"]) == (item["metadata"]["color"] == "red")
    # a catalog id keeps the catalog's own description
    body = client.post("/search", data={"text": "is red", "id": image_id, "k": 5}).json()
    assert body["prompt"] == {"source": "catalog", "description": metadata[image_id]["description"]}


def test_filters_same_type_and_honest_k(client, served):
    _, (paths, metadata), _, _ = served
    image_id = sorted(paths)[3]
    category = metadata[image_id]["category"]
    same = [i for i in paths if metadata[i]["category"] == category and i != image_id]
    body = client.post("/search", data={"text": "is darker", "id": image_id, "k": 50, "same_type": "true"}).json()
    assert sorted(r["id"] for r in body["results"]) == sorted(same)  # every match, none other: k is honest
    assert body["filters"] == {"category": [category]} and body["more"] is False
    assert all("kept" in r["match"] and category in r["match"]["kept"] for r in body["results"])
    unfiltered = client.post("/search", data={"text": "is darker", "id": image_id, "k": 50}).json()
    assert {r["metadata"]["category"] for r in unfiltered["results"]} != {category}  # the switch is off by default
    colors = sorted({m["color"] for m in metadata.values()})[:2]
    body = client.post("/search", data={"text": "x", "id": image_id, "k": 5, "color": colors}).json()
    assert len(body["results"]) == 5 and all(r["metadata"]["color"] in colors for r in body["results"])
    wanted = sum(metadata[i]["color"] in colors for i in paths if i != image_id)
    assert body["more"] is (wanted > 5)


def test_pages_continue_each_other_and_more_like_this(client, served):
    _, (paths, _), _, _ = served
    image_id = sorted(paths)[5]
    whole = client.post("/search", data={"text": "is blue", "id": image_id, "k": 20}).json()["results"]
    first = client.post("/search", data={"text": "is blue", "id": image_id, "k": 10}).json()
    second = client.post("/search", data={"text": "is blue", "id": image_id, "k": 10, "offset": 10}).json()
    assert [r["id"] for r in first["results"] + second["results"]] == [r["id"] for r in whole]
    assert [r["rank"] for r in second["results"]] == list(range(11, 21)) and first["more"] is True
    last = client.post("/search", data={"text": "is blue", "id": image_id, "k": 10, "offset": 55}).json()
    assert len(last["results"]) == 4 and last["more"] is False  # 59 items besides the reference
    like = client.post("/search", data={"id": image_id, "similar": "true", "k": 5}).json()
    assert like["query_text"] == "" and like["text"] == "" and len(like["results"]) == 5
    assert client.post("/search", data={"id": image_id, "k": 5}).status_code == 422


def test_catalog_words_match_in_any_order(client, served):
    _, (_, metadata), _, _ = served
    record = next(m for m in metadata.values() if m["color"] and m["category"])
    one = client.get("/items", params={"q": f"{record['color']} {record['category']}", "n": 200}).json()
    other = client.get("/items", params={"q": f"{record['category']} {record['color']}", "n": 200}).json()
    assert one["matched"] == other["matched"] >= 1


def test_cli_search_leaves_the_reference_out_and_predicts_for_images(served):
    _, (paths, _), _, root = served
    image_id = sorted(paths)[0]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_cir.cli",
            "search",
            "--index",
            str(root / "index"),
            "--id",
            image_id,
            "--text",
            "is red",
            "-k",
            "59",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": "src"},
    )
    assert out.returncode == 0, out.stderr
    assert image_id not in [h["id"] for h in json.loads(out.stdout)] and len(json.loads(out.stdout)) == 59
    result = CliRunner().invoke(
        cli_app,
        ["search", "--index", str(root / "index"), "--image", str(paths[image_id]), "--text", "is red", "-k", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "[prompt: predicted]" in result.output and ", but is red" in result.output


def command_paths(group, prefix=()):
    import typer.main

    command = typer.main.get_command(group) if prefix == () else group
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, prefix + (name,))
    if not getattr(command, "commands", None):
        yield prefix, command


def test_every_option_has_help_that_fits_80_columns():
    runner = CliRunner()
    checked = 0
    for path, command in command_paths(cli_app):
        for param in command.params:
            assert getattr(param, "help", None), f"fashion-cir {' '.join(path)}: {param.name} has no help"
        result = runner.invoke(cli_app, [*path, "--help"], terminal_width=80)
        assert result.exit_code == 0
        long = [line for line in result.output.splitlines() if len(line) > 80]
        assert not long, f"fashion-cir {' '.join(path)} --help: {long[0]!r}"
        assert "…" not in result.output  # nothing is cut
        checked += 1
    assert checked >= 12
    assert "openclip:ViT-B-32:openai" in runner.invoke(cli_app, ["evaluate", "--help"], terminal_width=80).output
