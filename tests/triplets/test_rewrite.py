"""LLM rewrite of template captions through the openai backend (text-only chat completions) against
a real HTTP server process; invalid rewrites keep the template captions."""

from fashion_cir.captioning import build_captioner, load_precomputed
from fashion_cir.io import read_json
from fashion_cir.triplets import TripletConfig, generate_triplets
from fashion_cir.triplets.rewrite import parse_rewrite
from support.mllm import fake_mllm


def test_parse_rewrite_accepts_two_short_captions_only():
    assert parse_rewrite('Sure: ["is red and plain.", "has no stripes at all"]') == [
        "is red and plain",
        "has no stripes at all",
    ]
    assert parse_rewrite('["only one caption here"]') is None
    assert parse_rewrite("no list at all") is None
    assert parse_rewrite('["a", "b"]') is None


def test_rewrite_through_openai_backend(tmp_path, clothing_dir):
    with fake_mllm(tmp_path, name="log") as (url, log):
        rewriter = build_captioner("openai", model="fake-llm", base_url=url, concurrency=4)
        attributes = load_precomputed(clothing_dir / "attributes.jsonl")
        train = read_json(clothing_dir / "image_splits/split.clothing.train.json")[:600]
        ids = sorted(train)
        features = __import__("numpy").random.default_rng(0).normal(size=(len(ids), 16))
        triplets, stats = generate_triplets(
            attributes, features, ids, TripletConfig(max_triplets=20, band=(0, 0.5)), train_ids=train, rewriter=rewriter
        )
    assert stats["rewritten"] == len(triplets) == 20
    assert all(t["captions"] == ["is a bright shade with a new look", "has the requested change now"] for t in triplets)
    assert all(len(t["template_captions"]) == 2 and t["source"].endswith("+rewrite:openai:fake-llm") for t in triplets)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 20
