"""Triplet generation on the clothing catalog's train split (precomputed attributes, features from a
seeded random projection of one-hot attributes + noise): volume, FashionIQ compatibility, and an
independent check that EVERY caption agrees with the two images' attributes."""

import re

import numpy as np
import pytest

from fashion_cir.captioning import DEFAULT_VOCABULARY, load_precomputed
from fashion_cir.data.captions import sentence_query
from fashion_cir.data.triplets import parse_triplets
from fashion_cir.errors import DataError
from fashion_cir.io import read_json
from fashion_cir.triplets import TripletConfig, generate_triplets, write_triplets

WILDCARDS = {
    "sleeves": {"none"},
    "neckline": {"none"},
    "length": {None},
    "material": {"unknown"},
    "closure": {"unknown"},
}
GROUPS = [
    {"t-shirt", "longsleeve", "polo", "shirt", "top", "undershirt", "blouse"},
    {"pants", "shorts"},
    {"dress", "skirt"},
    {"outwear", "blazer", "hoodie", "sweater"},
]
SLEEVES = ["sleeveless", "short", "three-quarter", "long"]
LENGTHS = ["cropped", "hip", "thigh", "knee", "midi", "ankle", "full"]

# The checker's own lexicon: surface words -> (attribute, value). Written for this test, not imported.
LEXICON = {
    **{
        c: ("color", c)
        for c in [
            "black",
            "white",
            "grey",
            "beige",
            "brown",
            "red",
            "pink",
            "orange",
            "yellow",
            "green",
            "olive",
            "blue",
            "navy",
            "light blue",
            "purple",
        ]
    },
    "gray": ("color", "grey"),
    "navy blue": ("color", "navy"),
    "dark blue": ("color", "navy"),
    "pale blue": ("color", "light blue"),
    "sky blue": ("color", "light blue"),
    "multicolored": ("color", "multicolor"),
    "colorful": ("color", "multicolor"),
    "olive green": ("color", "olive"),
    **{
        w: ("category", c)
        for c, ws in {
            "t-shirt": ["t-shirt", "tee"],
            "longsleeve": ["long-sleeve top", "long-sleeved tee"],
            "shirt": ["shirt", "button-down shirt"],
            "polo": ["polo shirt", "polo"],
            "blouse": ["blouse"],
            "top": ["top"],
            "undershirt": ["undershirt", "vest top"],
            "dress": ["dress"],
            "skirt": ["skirt"],
            "pants": ["pants", "trousers"],
            "shorts": ["shorts"],
            "outwear": ["jacket", "coat"],
            "blazer": ["blazer"],
            "hoodie": ["hoodie"],
            "sweater": ["sweater", "jumper", "pullover"],
            "hat": ["hat"],
            "shoes": ["shoes"],
            "body": ["bodysuit", "onesie"],
            "bag": ["bag"],
        }.items()
        for w in ws
    },
    **{
        w: ("pattern", p)
        for p, ws in {
            "solid": ["solid", "plain"],
            "striped": ["striped", "stripes"],
            "checked": ["checked", "plaid", "check pattern", "plaid pattern"],
            "floral": ["floral", "floral print", "flowers"],
            "dotted": ["polka dot", "polka dots", "dots", "dotted"],
            "graphic print": ["graphic print", "printed graphic", "graphic"],
            "text print": ["lettering", "text print", "writing"],
            "camouflage": ["camouflage", "camo", "camouflage pattern", "camo print"],
            "animal print": ["animal print"],
            "other": ["patterned", "pattern"],
        }.items()
        for w in ws
    },
    **{
        w: ("sleeves", s)
        for s, ws in {
            "sleeveless": ["sleeveless", "no sleeves"],
            "short": ["short sleeves", "short-sleeved"],
            "three-quarter": ["three-quarter sleeves", "three-quarter sleeved"],
            "long": ["long sleeves", "long-sleeved"],
        }.items()
        for w in ws
    },
    **{
        w: ("neckline", n)
        for n, ws in {
            "crew": ["crew neck", "round neck"],
            "v-neck": ["v-neck", "v neck"],
            "collar": ["collar"],
            "hood": ["hood"],
            "turtleneck": ["turtleneck", "high neck"],
            "scoop": ["scoop neck"],
            "strapless": ["strapless", "no straps"],
        }.items()
        for w in ws
    },
    **{
        f"{w} length": ("length", length)
        for length, w in [
            ("hip", "hip"),
            ("thigh", "thigh"),
            ("thigh", "mini"),
            ("knee", "knee"),
            ("midi", "midi"),
            ("ankle", "ankle"),
            ("full", "full"),
            ("full", "floor"),
        ]
    },
    "cropped": ("length", "cropped"),
    **{
        w: ("material", m)
        for m, ws in {
            "denim": ["denim"],
            "knit": ["knit", "knitted"],
            "cotton": ["cotton"],
            "leather": ["leather"],
            "fleece": ["fleece"],
            "wool": ["wool", "woolen"],
            "puffer": ["quilted", "padded"],
            "lace": ["lace"],
            "satin": ["satin"],
            "synthetic": ["synthetic"],
        }.items()
        for w in ws
    },
    **{
        w: ("closure", c)
        for c, ws in {
            "zip": ["zipper", "zip front"],
            "buttons": ["buttons", "button front"],
            "laces": ["laces"],
        }.items()
        for w in ws
    },
    "longer sleeves": ("sleeves", "longer"),
    "shorter sleeves": ("sleeves", "shorter"),
    "longer": ("length", "longer"),
    "shorter": ("length", "shorter"),
    "darker": ("color", "darker"),
    "lighter": ("color", "lighter"),
}
# the checker's own lightness levels (coarse): "darker" must go down at least one level
LIGHT = {"black": 0, "navy": 1, "brown": 1, "purple": 2, "olive": 2, "green": 2, "blue": 2, "red": 2, "grey": 3}
LIGHT |= {"orange": 4, "pink": 4, "light blue": 4, "yellow": 5, "beige": 5, "white": 6}
GARMENT_WORDS = re.compile(
    r"\b(t-shirt|tee|shirt|polo|blouse|top|undershirt|vest|dress|skirt|pants|trousers|shorts|jacket|coat|blazer|"
    r"hoodie|sweater|jumper|pullover|hat|shoes|bodysuit|onesie|bag|piece)\b"
)
PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(LEXICON, key=len, reverse=True)) + r")\b")
NEGATION = re.compile(r"\b(instead of|rather than|not|no|unlike|without)\b")


def _features(attributes: dict, ids: list[str], config: TripletConfig, seed: int = 0) -> np.ndarray:
    vocab = config.vocabulary
    columns = [(n, v) for n in vocab.names for v in (*vocab.attributes[n].values, None)]
    index = {c: k for k, c in enumerate(columns)}
    onehot = np.zeros((len(ids), len(columns)), np.float32)
    for row, image_id in enumerate(ids):
        for name in vocab.names:
            onehot[row, index[(name, attributes[image_id][name])]] = 1
    rng = np.random.default_rng(seed)
    return onehot @ rng.normal(size=(len(columns), 64)) + 0.5 * rng.normal(size=(len(ids), 64))


@pytest.fixture(scope="module")
def catalog(clothing_dir):
    attributes = load_precomputed(clothing_dir / "attributes.jsonl")
    train = read_json(clothing_dir / "image_splits/split.clothing.train.json")
    ids = sorted(attributes)
    return attributes, train, ids, _features(attributes, ids, TripletConfig())


@pytest.fixture(scope="module")
def generated(catalog):
    attributes, train, ids, features = catalog
    return generate_triplets(attributes, features, ids, TripletConfig(), train_ids=train)


def _caption_problems(caption: str, ref, tgt, changes: dict) -> list[str]:
    text = caption.lower()
    if tgt.description.lower() in text:
        return []  # the target's own description (SPN4CIR's "{tgt}" template) describes the target
    problems, touches_change = [], False
    for segment in re.split(r",| and | but ", text):
        for match in PATTERN.finditer(segment):
            attr, value = LEXICON[match.group(1)]
            negated = bool(NEGATION.search(segment[: match.start()]))
            touches_change |= attr in changes or (attr == "color" and "secondary_color" in changes)
            if value in ("darker", "lighter"):
                old, new = changes.get("color", (None, None))
                if old not in LIGHT or new not in LIGHT or (LIGHT[new] < LIGHT[old]) != (value == "darker"):
                    problems.append(f"{value!r} does not match the color change {changes.get('color')}")
                if old in LIGHT and new in LIGHT and LIGHT[new] == LIGHT[old]:
                    problems.append(f"{value!r} for colours of one lightness {changes.get('color')}")
            elif value in ("longer", "shorter"):
                order = SLEEVES if attr == "sleeves" else LENGTHS
                old, new = changes.get(attr, (None, None))
                if old is None or (order.index(new) > order.index(old)) != (value == "longer"):
                    problems.append(f"comparative {match.group(1)!r} does not match {attr} change {changes.get(attr)}")
            elif attr == "color":
                side = ref if negated else tgt
                if value not in (side["color"], side["secondary_color"]):
                    problems.append(
                        f"{'negated ' if negated else ''}{match.group(1)!r} is not a color of the {'reference' if negated else 'target'}"
                    )
            elif value != (ref if negated else tgt)[attr]:
                problems.append(
                    f"{'negated ' if negated else ''}{match.group(1)!r}: {attr} of the {'reference' if negated else 'target'} "
                    f"is {(ref if negated else tgt)[attr]!r}"
                )
    if not touches_change:
        problems.append("mentions none of the changes")
    return problems


def test_thousands_of_triplets_on_clothing_train(generated, catalog):
    triplets, stats = generated
    _, train, _, _ = catalog
    assert stats["triplets"] == len(triplets) >= 5000
    assert stats["pool_images"] == len(train) and stats["skipped"]["not_in_train"] == 5756 - len(train)
    train = set(train)
    assert all({t["candidate"], t["target"], *t["hard_negatives"]} <= train for t in triplets)
    assert len({(t["candidate"], t["target"]) for t in triplets}) == len(triplets)
    histogram = stats["changes_histogram"]
    assert len(histogram) == 9 and max(histogram.values()) < 1.2 * min(histogram.values())  # balanced
    assert set(stats["changes_per_triplet"]) == {1, 2, 3}
    assert stats["distinct_captions"] > 0.8 * 2 * len(triplets)
    assert stats["hard_negatives_per_triplet"]["mean"] > 3


def test_every_caption_is_consistent_with_the_attributes(generated, catalog):
    attributes = catalog[0]
    triplets, _ = generated
    problems = []
    for t in triplets:
        ref, tgt = attributes[t["candidate"]], attributes[t["target"]]
        assert t["reference_prompt"] == ref.description and t["target_prompt"] == tgt.description
        assert 1 <= len(t["changes"]) <= 3 and len(t["captions"]) == 2 and t["captions"][0] != t["captions"][1]
        for name in ref.values:  # changes are exactly the real (non-wildcard) differences
            old, new = ref[name], tgt[name]
            real = old != new and old not in WILDCARDS.get(name, ()) and new not in WILDCARDS.get(name, ())
            assert (name in t["changes"]) == real, (t, name)
            if real:
                assert t["changes"][name] == [old, new]
        if ref["category"] != tgt["category"]:
            assert any({ref["category"], tgt["category"]} <= g for g in GROUPS)
        for caption in t["captions"]:
            problems += [
                f"{caption!r} ({t['changes']}): {p}" for p in _caption_problems(caption, ref, tgt, t["changes"])
            ]
    assert not problems, f"{len(problems)} problems, e.g. " + "\n".join(problems[:15])


def test_change_only_captions_say_only_what_changes(catalog):
    """Issue 19 item 3: captions a shopper types to refine a result ("same but darker"): consistent
    with the attributes, no garment type unless the category changes, comparatives in the right
    direction; the share of such triplets follows the config and the pairs do not change."""
    attributes, train, ids, features = catalog
    config = TripletConfig(max_triplets=600, hard_negatives=2)
    plain, _ = generate_triplets(attributes, features, ids, config, train_ids=train)
    mixed, stats = generate_triplets(
        attributes, features, ids, config.model_copy(update={"change_only_share": 0.5}), train_ids=train
    )
    strip = lambda t: (t["candidate"], t["target"], t["changes"], t["hard_negatives"])  # noqa: E731
    assert [strip(t) for t in mixed] == [strip(t) for t in plain]
    change_only = [t for t in mixed if t["source"].endswith("/change-only")]
    assert stats["change_only"] == len(change_only) and 240 <= len(change_only) <= 360
    assert not any(t["source"].endswith("/change-only") for t in plain)
    problems, comparatives = [], 0
    for t in change_only:
        ref, tgt = attributes[t["candidate"]], attributes[t["target"]]
        assert len(t["captions"]) == 2 and t["captions"][0] != t["captions"][1], t
        for caption in t["captions"]:
            comparatives += bool(re.search(r"\b(darker|lighter|longer|shorter)\b", caption))
            problems += [
                f"{caption!r} ({t['changes']}): {p}" for p in _caption_problems(caption, ref, tgt, t["changes"])
            ]
            if "category" not in t["changes"] and GARMENT_WORDS.search(caption.lower()):
                problems.append(f"{caption!r} names a garment type that does not change")
            if tgt.description.lower() in caption.lower():
                problems.append(f"{caption!r} copies the target's description")
    assert not problems, f"{len(problems)} problems, e.g. " + "\n".join(problems[:15])
    assert comparatives > 50
    with pytest.raises(ValueError, match="change_only_share"):
        TripletConfig(change_only_share=1.5)


def test_hard_negatives_miss_a_change_and_keep_the_rest(generated, catalog):
    attributes = catalog[0]
    triplets, _ = generated
    for t in triplets[:500]:
        tgt = attributes[t["target"]]
        assert t["candidate"] not in t["hard_negatives"] and t["target"] not in t["hard_negatives"]
        for negative in t["hard_negatives"]:
            neg = attributes[negative]
            for name in tgt.values:
                wild = WILDCARDS.get(name, ())
                if name not in t["changes"]:
                    assert neg[name] == tgt[name] or neg[name] in wild or tgt[name] in wild
            assert any(neg[n] != tgt[n] and neg[n] not in WILDCARDS.get(n, ()) for n in t["changes"])


def test_written_output_is_fashioniq_compatible(generated, tmp_path):
    triplets, stats = generated
    config = TripletConfig()
    paths = write_triplets(tmp_path / "triplets.clothing.train.json", triplets[:200], stats, config)
    loaded = parse_triplets(read_json(paths["triplets"]), str(paths["triplets"]))
    assert len(loaded) == 200 and loaded[0].hard_negatives == triplets[0]["hard_negatives"]
    assert loaded[0].reference_prompt == triplets[0]["reference_prompt"]
    query = sentence_query(loaded[0].reference_prompt, loaded[0].captions[0])
    assert query.startswith(triplets[0]["reference_prompt"].rstrip(".")) and ", but " in query
    saved = read_json(paths["config"])["config"]
    assert TripletConfig.model_validate(saved) == config
    assert read_json(paths["stats"])["triplets"] == stats["triplets"]


def test_deterministic_and_skips_uncaptioned(catalog):
    attributes, train, ids, features = catalog
    config = TripletConfig(seed=3, max_triplets=300, band=(5, 600), band_unit="rank", hard_negatives=3)
    partial = {k: v for k, v in attributes.items() if not k.startswith(("0", "1")) or k not in train}
    missing = sum(1 for k in train if k not in partial)
    first, stats = generate_triplets(partial, features, ids, config, train_ids=train)
    second, _ = generate_triplets(partial, features, ids, config, train_ids=train)
    assert first == second and len(first) == 300
    assert stats["skipped"]["not_captioned"] == missing > 0
    assert all(t["candidate"] in partial and t["target"] in partial for t in first)
    other, _ = generate_triplets(partial, features, ids, config.model_copy(update={"seed": 4}), train_ids=train)
    assert other != first


def test_rejects_bad_inputs(catalog):
    attributes, train, ids, features = catalog
    with pytest.raises(DataError, match="aligned with ids"):
        generate_triplets(attributes, features[:10], ids, TripletConfig())
    with pytest.raises(DataError, match="usable images"):
        generate_triplets(attributes, features, ids, TripletConfig(), train_ids=["nope"])
    with pytest.raises(ValueError, match="band"):
        TripletConfig(band=(0.5, 0.2))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TripletConfig(attributes=("category", "fit"))


def test_a_smaller_custom_vocabulary_generates_captions(catalog):
    """A catalog whose vocabulary has only category, color and sleeves (with an extra sleeve value)
    still gets triplets and captions: phrasing never assumes the default attribute names."""
    from fashion_cir.captioning.schema import Attributes
    from fashion_cir.captioning.vocab import AttributeVocab, Vocabulary

    attributes, train, ids, features = catalog
    default = DEFAULT_VOCABULARY.attributes
    vocab = Vocabulary(
        attributes={
            "category": default["category"],
            "color": default["color"],
            "sleeves": AttributeVocab(values=(*default["sleeves"].values, "cap"), wildcards=("none",)),
        },
        compatible_categories=DEFAULT_VOCABULARY.compatible_categories,
    )
    small = {
        i: Attributes(values={k: a[k] for k in vocab.names}, kids=a.kids, description=a.description)
        for i, a in attributes.items()
    }
    for image_id in list(small)[:300:3]:
        small[image_id] = small[image_id].model_copy(update={"values": {**small[image_id].values, "sleeves": "cap"}})
    config = TripletConfig(seed=1, max_triplets=400, band=(5, 800), band_unit="rank", vocabulary=vocab)
    generated, stats = generate_triplets(small, features, ids, config, train_ids=train)
    assert len(generated) == 400
    assert set(stats["changes_histogram"]) <= {"category", "color", "sleeves"}
    assert any("cap" in t["changes"].get("sleeves", ()) for t in generated)
    assert all(len(t["captions"]) == 2 and all(c.strip() for c in t["captions"]) for t in generated)
