"""``fashion-cir demo``: every pipeline stage on the clothing catalog with the offline backbone.

Outputs land in ``runs/demo/``: the aligned backbone, generated triplets, one loadable model folder
per stage (``zero-shot``, ``stage1``, ``stage2``, ``best``), metrics JSON, a results table and a
picture of example queries. Caches (features, triplets, finished stages) make a re-run cheap."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data.catalog import ClothingCatalog, load_clothing_catalog
from .data.triplets import TripletSet, load_triplet_set, parse_triplets
from .evaluation.evaluate import EvalOptions, evaluate_sets
from .features.cache import FeatureCache
from .io import atomic_write_text, environment_info, read_json, text_sha1, write_json
from .models.cir import CIRModel
from .models.factory import create_backbone
from .models.matcher import DescriptionMatcher

ANNOTATED = "annotated-val"
GENERATED = "generated-val"
KS = (1, 5, 10, 50)
PROTOCOLS = ("split", "catalog")  # gallery = the val split (reference kept, FashionIQ) / the whole catalog (reference removed)
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    catalog: Path | None = None
    fast: bool = False
    serve: bool = True
    port: int = 8000
    seed: int = 0
    align_epochs: int = 15
    matcher: str | None = "minilm"  # the description matcher's encoder (None: image-only catalog items)
    matcher_template: str = "caption"
    stages: list[str] = field(default_factory=lambda: ["zero-shot", "stage1", "stage2"])

    def scaled(self) -> "DemoConfig":
        """--fast: fewer epochs and images, same code paths."""
        if self.fast:
            self.align_epochs = 5
        return self


class Demo:
    def __init__(self, config: DemoConfig):
        self.config = config.scaled()
        self.out = Path(config.out)
        self.cache = FeatureCache(self.out / "features")
        self.rows: list[dict] = []
        self.ranks: dict[tuple[str, str, str], list[int]] = {}  # (stage, protocol, set) -> per-query target ranks
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    # -- stages ------------------------------------------------------------------------------------
    def catalog(self) -> ClothingCatalog:
        catalog = load_clothing_catalog(self.config.catalog)
        if self.config.fast:  # a small slice of every split keeps --fast quick
            keep = {s: ids[: {"train": 600, "val": 200, "test": 0}[s]] for s, ids in catalog.splits.items()}
            catalog.splits = keep
        return catalog

    def aligned_backbone(self, catalog: ClothingCatalog):
        from .training.align import AlignConfig, align_offline_backbone

        folder = self.out / "offline-backbone"
        config = AlignConfig(epochs=self.config.align_epochs, seed=self.config.seed)
        saved = folder / "offline_backbone.json"
        if not saved.is_file() or read_json(saved).get("align", {}).get("config") != asdict(config):
            self.log("aligning the offline backbone (EfficientNet-Lite0 + MiniLM projections) on the train split")
            _, summary = align_offline_backbone(catalog, folder, self.cache, config)
            self.log(f"aligned: loss {summary['first_epoch_loss']:.3f} -> {summary['last_epoch_loss']:.3f}, "
                     f"val image->text R@10 {summary['best_val_image_to_text_R@10']:.1f}")
        else:
            self.log(f"reusing aligned offline backbone in {folder}")
        return create_backbone(f"offline:{folder}")

    def val_sets(self, catalog: ClothingCatalog, generated_val: list[dict]) -> dict[str, TripletSet]:
        annotated = load_triplet_set(catalog.captions_file("val"), catalog.split_file("val"), catalog.root / "images", name=ANNOTATED)
        if self.config.fast:
            allowed = set(catalog.splits["val"])
            annotated.gallery_ids = [i for i in annotated.gallery_ids if i in allowed]
            annotated.triplets = [t for t in annotated.triplets if t.candidate in allowed and t.target in allowed]
        generated = TripletSet(GENERATED, parse_triplets(generated_val, GENERATED), list(catalog.split_paths("val")),
                               {i: catalog.image_paths[i] for i in catalog.image_paths}, [], 0)
        generated.triplets = [t for t in generated.triplets if t.candidate in catalog.image_paths and t.target in catalog.image_paths]
        return {ANNOTATED: annotated, GENERATED: generated}

    def triplets(self, model: CIRModel, catalog: ClothingCatalog, split: str) -> list[dict]:
        """Generated triplets for ``split``, mined within that split only (cached by file)."""
        from .captioning import load_precomputed
        from .triplets import TripletConfig, generate_triplets, write_triplets

        path = self.out / "triplets" / f"{split}.json"
        # one target per reference; the train cap keeps a cold CPU demo under 15 minutes
        config = TripletConfig(seed=self.config.seed, targets_per_reference=1,
                               max_triplets=3600 if split == "train" else None)
        key = text_sha1(str(catalog.root.resolve()), model.backbone.image_fingerprint(), config.model_dump_json(),
                        *catalog.splits[split])
        key_file = path.with_suffix(".key")
        if path.is_file() and key_file.is_file() and key_file.read_text() == key:
            return read_json(path, "generated triplets")
        attributes = load_precomputed(catalog.root / "attributes.jsonl")
        paths = {i: p for i, p in catalog.split_paths(split).items() if i in attributes}
        ids, features = self.cache.encode(model.backbone, paths, on_error="skip")
        generated, stats = generate_triplets(attributes, features, ids, config, train_ids=ids)
        write_triplets(path, generated, stats, config)
        atomic_write_text(key_file, key)
        self.log(f"generated {len(generated)} {split} triplets from {len(ids)} images")
        return generated

    def catalog_sets(self, catalog: ClothingCatalog, sets: dict[str, TripletSet]) -> dict[str, TripletSet]:
        """The same queries with the whole catalog (every split) as the gallery."""
        everything = [i for s in ("train", "val", "test") for i in catalog.splits.get(s, []) if i in catalog.image_paths]
        return {name: TripletSet(name, s.triplets, everything, catalog.image_paths, [], s.skipped_triplets)
                for name, s in sets.items()}

    def evaluate(self, name: str, model: CIRModel, sets: dict[str, dict[str, TripletSet]], descriptions: dict[str, str],
                 modes: tuple[str, ...], label: str | None = None, describe: str = "catalog") -> dict:
        """Score ``model`` under each protocol; rows carry 95% bootstrap intervals of R@10 and R@50."""
        from .evaluation.stats import recall_interval

        reports = {}
        for protocol, protocol_sets in sets.items():
            options = EvalOptions(modes=modes, progress=False, keep_ranks=True, remove_reference=protocol == "catalog",
                                  describe=describe)
            report = evaluate_sets(model, protocol_sets, self.cache, options, descriptions)
            reports[protocol] = report
            for mode, table in report.items():
                for set_name in protocol_sets:
                    metrics = table[set_name]
                    stage = label or name
                    self.ranks[(f"{stage}/{mode}", protocol, set_name)] = metrics["ranks"]
                    intervals = {f"R@{k}_ci": recall_interval(metrics["ranks"], k)[1:] for k in (10, 50)}
                    self.rows.append({"stage": stage, "mode": mode, "protocol": protocol, "set": set_name,
                                      **{f"R@{k}": metrics[f"R@{k}"] for k in KS}, **intervals,
                                      "n_queries": metrics["n_queries"], "n_gallery": metrics["n_gallery"]})
        return reports

    def calibrate(self, model: CIRModel, sets: dict[str, TripletSet], descriptions: dict[str, str]) -> float:
        """Choose the matcher's fusion weight on the annotated val captions (split protocol, mean of
        R@10 and R@50); returns the chosen weight, which stays set on the model."""
        if model.matcher is None:
            return 0.0
        options = EvalOptions(modes=(model.query_mode,), progress=False)
        scores = {}
        for weight in WEIGHT_GRID:
            model.matcher.weight = weight
            report = evaluate_sets(model, {ANNOTATED: sets[ANNOTATED]}, self.cache, options, descriptions)
            scores[weight] = report[model.query_mode][ANNOTATED]["overall"]
        model.matcher.weight = max(scores, key=lambda w: (scores[w], -abs(w - 0.5)))
        self.log(f"matcher weight {model.matcher.weight} (annotated val overall by weight: "
                 + ", ".join(f"{w}: {v:.1f}" for w, v in scores.items()) + ")")
        return model.matcher.weight

    def random_rows(self, sets: dict[str, dict[str, TripletSet]]) -> None:
        """Expected recall of a random ranking: K / gallery size (one fewer with the reference removed)."""
        for protocol, protocol_sets in sets.items():
            for set_name, triplet_set in protocol_sets.items():
                g = len(triplet_set.gallery_ids) - (protocol == "catalog")
                self.rows.append({"stage": "random", "mode": "-", "protocol": protocol, "set": set_name,
                                  **{f"R@{k}": 100.0 * min(k, g) / g for k in KS},
                                  "n_queries": len(triplet_set.triplets), "n_gallery": g})

    def table(self) -> str:
        header = "| stage | mode | protocol | set | " + " | ".join(f"R@{k}" for k in KS) + " | R@10 95% CI | R@50 95% CI | queries | gallery |"
        lines = [header, "|" + "---|" * (len(KS) + 8)]
        for row in sorted(self.rows, key=lambda r: (r["protocol"] != "split", r["set"] != ANNOTATED)):
            ci = [f"{row[f'R@{k}_ci'][0]:.1f}-{row[f'R@{k}_ci'][1]:.1f}" if f"R@{k}_ci" in row else "-" for k in (10, 50)]
            lines.append(f"| {row['stage']} | {row['mode']} | {row['protocol']} | {row['set']} | "
                         + " | ".join(f"{row[f'R@{k}']:.2f}" for k in KS)
                         + f" | {ci[0]} | {ci[1]} | {row['n_queries']} | {row['n_gallery']} |")
        return "\n".join(lines)

    def differences(self, pairs: list[tuple[str, str]]) -> str:
        """Paired bootstrap differences (R@10, R@50) between stages on the same annotated val queries."""
        from .evaluation.stats import paired_difference

        lines = ["| comparison | protocol | R@10 diff (95% CI) | R@50 diff (95% CI) |", "|---|---|---|---|"]
        for a, b in pairs:
            for protocol in PROTOCOLS:
                ra, rb = self.ranks.get((a, protocol, ANNOTATED)), self.ranks.get((b, protocol, ANNOTATED))
                if ra is None or rb is None:
                    continue
                cells = [paired_difference(ra, rb, k) for k in (10, 50)]
                lines.append(f"| {a} - {b} | {protocol} | " + " | ".join(f"{d:+.1f} ({lo:+.1f} to {hi:+.1f})" for d, lo, hi in cells) + " |")
        return "\n".join(lines)


def _selection_score(row: dict) -> float:
    return (row["R@10"] + row["R@50"]) / 2


def attribute_heads(demo: Demo, catalog: ClothingCatalog, sets: dict[str, dict[str, TripletSet]], descriptions: dict[str, str]) -> None:
    """Attribute heads for ``best`` (uploads get a predicted description), and ``best`` evaluated
    with predicted instead of catalog descriptions in its prompts."""
    from .training.attribute_heads import fit_attribute_heads, format_report

    best = CIRModel.load(demo.out / "best")
    heads = fit_attribute_heads(best, catalog, demo.cache)
    heads.save(demo.out / "best")
    atomic_write_text(demo.out / "attributes.md", format_report(heads) + "\n")
    val = heads.info["val"]
    demo.log("attribute heads on val: mean accuracy "
             f"{sum(r['accuracy'] for r in val.values()) / len(val):.1f}% (majority class "
             f"{sum(r['majority_accuracy'] for r in val.values()) / len(val):.1f}%); table in attributes.md")
    demo.evaluate("best-predicted-prompt", best, {protocol: {ANNOTATED: s[ANNOTATED]} for protocol, s in sets.items()},
                  descriptions, (best.query_mode,), describe="predicted")


def publish_model(source: Path, destination: Path) -> None:
    """Copy a model folder to ``destination``, replacing what was there (via a temporary folder)."""
    staging = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(destination, ignore_errors=True)
    staging.replace(destination)


def run_demo(config: DemoConfig) -> dict:
    demo = Demo(config)
    out = demo.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo_config.json", {**asdict(demo.config), "versions": environment_info()})
    catalog = demo.catalog()
    descriptions = catalog.descriptions()
    backbone = demo.aligned_backbone(catalog)

    plain = CIRModel(backbone, query_mode="sum")  # catalog items are their image features alone
    plain.descriptions_source = str((catalog.root / "attributes.jsonl").resolve())
    train_triplets = demo.triplets(plain, catalog, "train")
    val_triplets = demo.triplets(plain, catalog, "val")
    split_sets = demo.val_sets(catalog, val_triplets)
    sets = {"split": split_sets, "catalog": demo.catalog_sets(catalog, split_sets)}
    demo.random_rows(sets)
    demo.log("evaluating zero-shot (image, text, sum; with and without the sentence-level prompt)")
    zero_shot_scores = {}
    for template, modes in (("prompt", ("image", "text", "sum")), ("caption", ("text", "sum"))):
        plain.text_template = template
        label = "zero-shot" if template == "prompt" else "zero-shot-no-prompt"
        report = demo.evaluate(label, plain, sets, descriptions, modes)
        zero_shot_scores.update({(template, mode): report["split"][mode][ANNOTATED]["overall"] for mode in modes})
    template, mode = max(zero_shot_scores, key=zero_shot_scores.get)
    demo.log(f"best zero-shot without descriptions: {mode} ({'with' if template == 'prompt' else 'without'} prompt)")
    plain.text_template, plain.query_mode = template, mode
    plain.save(out / "zero-shot", {"stage": "zero-shot"})
    candidates = {"zero-shot": out / "zero-shot"}
    references = {"zero-shot": f"{'zero-shot' if template == 'prompt' else 'zero-shot-no-prompt'}/{mode}"}
    if demo.config.matcher:
        described = CIRModel(backbone, query_mode="sum", text_template="prompt",
                             matcher=DescriptionMatcher(demo.config.matcher, demo.config.matcher_template))
        described.descriptions_source = plain.descriptions_source
        saved = out / "zero-shot-described" / "model.json"
        previous = (read_json(saved).get("matcher") or {}) if saved.is_file() else {}
        if {k: previous.get(k) for k in ("spec", "template")} == {k: described.matcher.config()[k] for k in ("spec", "template")}:
            described.matcher.weight = float(previous["weight"])
            demo.log(f"reusing the calibrated matcher weight {described.matcher.weight} of {saved.parent}")
        else:
            demo.calibrate(described, split_sets, descriptions)
        demo.evaluate("zero-shot-described", described, sets, descriptions, ("sum",))
        described.save(out / "zero-shot-described", {"stage": "zero-shot-described"})
        candidates["zero-shot-described"] = out / "zero-shot-described"
        references["zero-shot-described"] = "zero-shot-described/sum"

    from .demo_stages import run_training_stages

    start_from = candidates.get("zero-shot-described", candidates["zero-shot"])
    candidates.update(run_training_stages(demo, start_from, catalog, train_triplets, sets, descriptions))
    references.update({name: f"{name}/{read_json(folder / 'model.json')['query_mode']}" for name, folder in candidates.items()
                       if name not in references})

    scores = {}
    for stage, key in references.items():
        stage_name, mode = key.split("/")
        rows = [r for r in demo.rows if r["stage"] == stage_name and r["mode"] == mode
                and r["set"] == ANNOTATED and r["protocol"] == "split"]
        scores[stage] = _selection_score(rows[0])
    best = max(scores, key=scores.get)
    publish_model(candidates[best], out / "best")
    write_json(out / "best" / "selected.json", {"stage": best, "selection": "mean of R@10 and R@50 on annotated val captions "
                                                 "(split protocol)", "scores": scores})
    demo.log(f"best on annotated val captions: {best}")
    attribute_heads(demo, catalog, sets, descriptions)
    zero_best = max(("zero-shot", "zero-shot-described"), key=lambda s: scores.get(s, -1))
    pairs = [("stage1", zero_best), ("stage2", "stage1"), ("stage1", "stage1-annotated-only"),
             ("stage1", "stage1-generated-only"), ("zero-shot-described", "zero-shot")]
    differences = demo.differences([(references[a], references[b]) for a, b in pairs
                                    if a in references and b in references])

    table = demo.table()
    atomic_write_text(out / "results.md", table + "\n\nPaired differences on the annotated val captions:\n\n" + differences + "\n")
    write_json(out / "results.json", {"rows": demo.rows, "best": best, "seconds": time.perf_counter() - demo.started,
                                      "ranks": {"|".join(k): v for k, v in demo.ranks.items()}})
    print("\nResults on the clothing val split (annotated captions = free language; generated = our triplets):")
    print(table)
    print("\nPaired differences (annotated val):")
    print(differences)
    from .demo_stages import finish_demo

    finish_demo(demo, catalog, split_sets, descriptions)
    return {"rows": demo.rows, "best": best}
