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

ANNOTATED = "annotated-val"
GENERATED = "generated-val"
KS = (1, 5, 10, 50)


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    catalog: Path | None = None
    fast: bool = False
    serve: bool = True
    port: int = 8000
    seed: int = 0
    align_epochs: int = 15
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

    def evaluate(self, name: str, model: CIRModel, sets: dict[str, TripletSet], descriptions: dict[str, str],
                 modes: tuple[str, ...], describe: str = "catalog") -> dict:
        report = evaluate_sets(model, sets, self.cache, EvalOptions(modes=modes, progress=False, describe=describe), descriptions)
        for mode, table in report.items():
            for set_name in sets:
                self.rows.append({"stage": name, "mode": mode, "set": set_name,
                                  **{f"R@{k}": table[set_name][f"R@{k}"] for k in KS},
                                  "n_queries": table[set_name]["n_queries"], "n_gallery": table[set_name]["n_gallery"]})
        return report

    def random_rows(self, sets: dict[str, TripletSet]) -> None:
        """Expected recall of a random ranking: K / gallery size."""
        for set_name, triplet_set in sets.items():
            g = len(triplet_set.gallery_ids)
            self.rows.append({"stage": "random", "mode": "-", "set": set_name,
                              **{f"R@{k}": 100.0 * min(k, g) / g for k in KS},
                              "n_queries": len(triplet_set.triplets), "n_gallery": g})

    def table(self) -> str:
        header = "| stage | mode | set | " + " | ".join(f"R@{k}" for k in KS) + " | queries | gallery |"
        lines = [header, "|" + "---|" * (len(KS) + 5)]
        for row in self.rows:
            lines.append(f"| {row['stage']} | {row['mode']} | {row['set']} | "
                         + " | ".join(f"{row[f'R@{k}']:.2f}" for k in KS) + f" | {row['n_queries']} | {row['n_gallery']} |")
        return "\n".join(lines)


def _selection_score(row: dict) -> float:
    return (row["R@10"] + row["R@50"]) / 2


def attribute_heads(demo: Demo, catalog: ClothingCatalog, sets: dict[str, TripletSet], descriptions: dict[str, str]) -> None:
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
    demo.evaluate("best, predicted prompt", best, {ANNOTATED: sets[ANNOTATED]}, descriptions, (best.query_mode,), "predicted")


def run_demo(config: DemoConfig) -> dict:
    demo = Demo(config)
    out = demo.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo_config.json", {**asdict(demo.config), "versions": environment_info()})
    catalog = demo.catalog()
    descriptions = catalog.descriptions()
    backbone = demo.aligned_backbone(catalog)

    zero_shot = CIRModel(backbone, query_mode="sum")
    zero_shot.save(out / "zero-shot", {"stage": "zero-shot"})
    train_triplets = demo.triplets(zero_shot, catalog, "train")
    val_triplets = demo.triplets(zero_shot, catalog, "val")
    sets = demo.val_sets(catalog, val_triplets)
    demo.random_rows(sets)
    demo.log("evaluating zero-shot (image, text, sum)")
    demo.evaluate("zero-shot", zero_shot, sets, descriptions, ("image", "text", "sum"))
    candidates = {"zero-shot": out / "zero-shot"}

    from .demo_stages import run_training_stages

    candidates.update(run_training_stages(demo, zero_shot, catalog, train_triplets, sets, descriptions))

    scores = {}
    for stage in candidates:
        rows = [r for r in demo.rows if r["stage"] == stage and r["set"] == ANNOTATED]
        model_mode = read_json(candidates[stage] / "model.json")["query_mode"]
        rows = [r for r in rows if r["mode"] == model_mode] or rows
        scores[stage] = max(_selection_score(r) for r in rows)
    best = max(scores, key=scores.get)
    if (out / "best").exists():
        shutil.rmtree(out / "best")
    shutil.copytree(candidates[best], out / "best")
    write_json(out / "best" / "selected.json", {"stage": best, "selection": "mean of R@10 and R@50 on annotated val captions",
                                                 "scores": scores})
    demo.log(f"best on annotated val captions: {best}")
    attribute_heads(demo, catalog, sets, descriptions)

    table = demo.table()
    atomic_write_text(out / "results.md", table + "\n")
    write_json(out / "results.json", {"rows": demo.rows, "best": best, "seconds": time.perf_counter() - demo.started})
    print("\nResults on the clothing val split (annotated captions = free language; generated = our triplets):")
    print(table)
    from .demo_stages import finish_demo

    finish_demo(demo, catalog, sets, descriptions)
    return {"rows": demo.rows, "best": best}
