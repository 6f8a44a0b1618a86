"""Filters and a live catalog end to end: the CLI (`index build --store`, `search --filter`,
`index remove`, `index upsert`) and the search API on a real uvicorn server, which sees removals
and updates without a restart, on both stores."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from typer.testing import CliRunner

from fashion_cir.cli import app
from fashion_cir.retrieval import build_index, open_index, remove_from_index
from fashion_cir.serving.app import create_app
from support.serving import running_server, synthetic_catalog

runner = CliRunner()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    paths, metadata = synthetic_catalog(root / "images", 40)
    attributes = root / "attributes.jsonl"
    attributes.write_text("".join(json.dumps({"image": i, **m}) + "\n" for i, m in metadata.items()), encoding="utf-8")
    return root, paths, metadata, attributes


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_cli_build_filter_remove_upsert(store, catalog, tmp_path):
    root, paths, metadata, attributes = catalog
    spec = "faiss" if store == "faiss" else f"milvus:{tmp_path / 'milvus.db'}"
    folder = tmp_path / "index"
    cli(
        "index",
        "build",
        str(folder),
        "--images",
        str(root / "images"),
        "--metadata",
        str(attributes),
        "--backbone",
        "tiny",
        "--store",
        spec,
        "--cache-dir",
        str(root / "cache"),
    )
    out = cli(
        "search",
        "--index",
        str(folder),
        "--id",
        "item-004",
        "--text",
        "is red",
        "-k",
        "4",
        "--json",
        "--filter",
        'category == "dress" and color != "black"',
    )
    hits = json.loads(out)
    assert len(hits) == 4 and all(
        h["metadata"]["category"] == "dress" and h["metadata"]["color"] != "black" for h in hits
    )
    bad = runner.invoke(app, ["search", "--index", str(folder), "--id", "item-004", "--filter", 'category = "dress"'])
    assert bad.exit_code == 2 and "unexpected character '='" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["search", "--index", str(folder), "--id", "item-004", "--filter", 'colour == "red"'])
    assert bad.exit_code == 2 and "unknown field 'colour'" in bad.output
    deep = "(" * 330 + 'color == "red"' + ")" * 330  # issue 22 item 3: a RecursionError traceback, exit 1
    bad = runner.invoke(app, ["search", "--index", str(folder), "--id", "item-004", "--filter", deep])
    assert bad.exit_code == 2 and "nested more than 32 levels deep" in bad.output and "Traceback" not in bad.output

    assert "removed 2 items; index now holds 38; 1 ids were not in the index, first: 'nope'" in cli(
        "index", "remove", str(folder), "item-010", "item-011", "nope"
    )
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("item-012\n\nitem-013\n")
    assert "removed 2 items; index now holds 36" in cli("index", "remove", str(folder), "--ids-file", str(ids_file))
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copy(paths["item-010"], changed / "item-010.jpg")  # back again
    shutil.copy(paths["item-020"], changed / "item-004.jpg")  # a new picture for item-004
    update = tmp_path / "update.jsonl"
    update.write_text(
        json.dumps({"image": "item-004", **metadata["item-020"], "color": "purple"})
        + "\n"
        + json.dumps({"image": "item-010", **metadata["item-010"]})
        + "\n"
    )
    out = cli("index", "upsert", str(folder), "--images", str(changed), "--metadata", str(update))
    assert "index now holds 37 images" in out and '"replaced": 1' in out
    index = open_index(folder)
    assert len(index) == 37 and index.metadata["item-004"]["color"] == "purple" and "item-011" not in index
    hits = json.loads(cli("search", "--index", str(folder), "--id", "item-020", "-k", "1", "--json"))
    assert [h["id"] for h in hits] == ["item-004"]  # same picture, upserted vector (the reference is left out)


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_api_filter_and_live_changes(store, catalog, tiny_model, tmp_path):
    root, paths, metadata, _ = catalog
    spec = "faiss" if store == "faiss" else f"milvus:{tmp_path / 'milvus.db'}"
    folder = tmp_path / "index"
    build_index(folder, tiny_model, paths, metadata, store=spec, cache_dir=root / "cache", progress=False)
    with running_server(create_app(folder, tiny_model)) as url, httpx.Client(base_url=url, timeout=60) as http:
        form = {
            "id": "item-001",
            "text": "is red",
            "k": "5",
            "filter": 'category in ["dress", "pants"] and not color == "red"',
        }
        answer = http.post("/search", data=form).json()
        assert len(answer["results"]) == 5 and answer["filter"] == form["filter"]
        for hit in answer["results"]:
            assert hit["metadata"]["category"] in ("dress", "pants") and hit["metadata"]["color"] != "red"
        bad = http.post("/search", data={**form, "filter": 'category == "dress" or'})
        assert bad.status_code == 422 and "unexpected end, expected a field name" in bad.json()["detail"]
        bad = http.post("/search", data={**form, "filter": 'category == "dress" & color == "red"'})
        assert bad.status_code == 422 and "unexpected character '&'" in bad.json()["detail"]
        few = http.post("/search", data={**form, "k": "50", "filter": 'color == "navy"'}).json()["results"]
        assert sorted(h["id"] for h in few) == sorted(i for i in paths if metadata[i]["color"] == "navy")
        health = http.get("/health").json()
        assert health["items"] == 40 and health["store"] == store and "color" in health["filter_fields"]

        # change the catalog while the service runs: FAISS through another process's kind of write
        # (a new data folder and a manifest swap), Milvus through the live collection
        remove_from_index(folder, ["item-002", "item-003"])
        assert http.get("/health").json()["items"] == 38
        assert http.get("/items/item-002").status_code == 404
        ranked = http.post("/search", data={"id": "item-001", "text": "x", "k": "40"}).json()["results"]
        assert len(ranked) == 37 and not {"item-002", "item-003"} & {h["id"] for h in ranked}
        assert http.post("/search", data={"id": "item-002", "text": "x"}).status_code == 404
        index = open_index(folder, tiny_model)
        index.upsert_features(
            ["item-005"],
            index.vector("item-005")[None],
            {"item-005": {**metadata["item-005"], "color": "gold"}},
            {"item-005": paths["item-005"]},
        )
        index.save()
        assert http.get("/items/item-005").json()["metadata"]["color"] == "gold"
        gold = http.post("/search", data={"id": "item-001", "text": "x", "k": "3", "filter": 'color == "gold"'}).json()
        assert [h["id"] for h in gold["results"]] == ["item-005"]


def test_new_commands_have_help():
    for command in (["index", "remove"], ["index", "upsert"], ["features", "encode"], ["features", "merge"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)
