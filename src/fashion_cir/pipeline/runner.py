"""``fashion-cir run RECIPE``: the recipe's steps in order, each content-keyed and resumable with the
library's own machinery (the FeatureCache, the caption cache, the alignment and triplet files that
record their settings, the training checkpoints, the evaluator's results cache):

    catalog (+ caption) -> towers (align) -> triplets -> baselines (+ fusion) -> stages -> select
    -> heads -> results -> pictures -> index (-> serve)

Every step prints a line with its elapsed time (progress lines inside the long ones) and the run
ends with the time per step, also written to ``timings.json``. Under torchrun the training stages
run on every rank; every other step runs on rank 0."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from ..data.catalog import ClothingCatalog, read_attributes, read_labels
from ..data.images import scan_images
from ..data.triplets import Triplet, TripletSet, load_triplet_set, parse_triplets, read_split
from ..errors import DataError, check_failures
from ..evaluation.evaluate import SPLIT, EvalOptions, Protocol, catalog_protocol
from ..evaluation.evaluator import Evaluator, Selection
from ..evaluation.stats import paired_difference, recall_interval
from ..features.cache import FeatureCache
from ..io import atomic_write_text, environment_info, file_sha1, read_json, text_sha1, write_json
from ..models.cir import CIRModel, publish_model
from ..models.factory import create_backbone
from ..models.fusion import AttributeSpace
from ..models.matcher import DescriptionMatcher
from ..training.config import RESUMABLE_FIELDS
from .recipe import BaselineSpec, IndexSpec, Recipe, StageSpec, TripletSource, expand_path

KS = (1, 5, 10, 50)
GENERATED_VAL = "generated-val"


CODE_ROOT = Path(__file__).resolve().parents[3]


def git_commit(root: Path = CODE_ROOT) -> str | None:
    """The commit checked out at ``root`` (the code that runs), with ``-dirty`` for uncommitted changes
    to tracked files; None outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runner:
    def __init__(self, recipe: Recipe, source: str = "recipe", serve: bool = False, port: int = 8000):
        self.recipe = recipe
        self.source = source
        self.serve = serve
        self.port = port
        self.out = Path(expand_path(recipe.out))
        self.cache = FeatureCache(self.out / "features")
        self.rows: list[dict] = []
        self.ranks: dict[str, list[int]] = {}  # "model/mode|protocol|set" -> per-query 0-based target ranks
        self.labels: dict[str, str] = {}  # model name -> "row label/mode" of its published scores
        self.timings: list[dict] = []
        self.started = time.perf_counter()
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A timed step: a line when it starts and one with its seconds when it ends."""
        self.log(f"{name} ...")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings.append({"step": name, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb())})
        self.log(f"{name}: {seconds:.0f} s")

    def barrier(self) -> None:
        if self.world > 1:
            if not dist.is_initialized():
                from ..training.distributed import setup_distributed

                setup_distributed()
            dist.barrier()

    # -- steps before training ------------------------------------------------------------------
    def record_run(self) -> None:
        """run.json: the resolved recipe, every input file with its sha1, versions, the git commit."""
        spec = self.recipe.catalog
        files = [
            *(f for files in spec.splits.values() for f in files),
            spec.attributes,
            spec.labels,
            *(s.captions for s in self.recipe.annotated),
            *(s.captions for s in self.recipe.evaluation.val),
        ]
        inputs = {}
        for name in files:
            if name is not None and Path(expand_path(name)).is_file():
                inputs[name] = file_sha1(Path(expand_path(name)))
        write_json(
            self.out / "run.json",
            {
                "source": self.source,
                "recipe": self.recipe.model_dump(mode="json"),
                "inputs": inputs,
                "versions": environment_info(),
                "git_commit": git_commit(),
            },
        )

    def catalog(self) -> ClothingCatalog:
        spec = self.recipe.catalog
        images = Path(expand_path(spec.images))
        if not images.is_dir():
            raise DataError(f"recipe catalog.images: {images} is not a folder of images")
        splits = {name: [i for f in files for i in read_split(expand_path(f))] for name, files in spec.splits.items()}
        if spec.slice:
            splits = {name: ids[: spec.slice.get(name, len(ids))] for name, ids in splits.items()}
        image_paths = scan_images(images)
        attributes_file = self.attributes_file(images, image_paths, splits)
        attributes = read_attributes(attributes_file) if attributes_file is not None else {}
        labels = read_labels(expand_path(spec.labels)) if spec.labels else {}
        return ClothingCatalog(images.parent, image_paths, labels, attributes, splits, attributes_file)

    def attributes_file(self, images: Path, image_paths: dict[str, Path], splits: dict[str, list[str]]) -> Path | None:
        """The catalog's attributes: the recipe's file, else the caption step's (cached per image)."""
        spec, caption = self.recipe.catalog, self.recipe.caption
        if spec.attributes and Path(expand_path(spec.attributes)).is_file():
            return Path(expand_path(spec.attributes))
        if caption is None:
            return None
        from ..captioning import build_captioner, load_vocabulary, run_captioning, write_attributes
        from ..captioning.runner import summary_path

        out = self.out / "attributes.jsonl"
        if not self.is_main and out.is_file():  # rank 0 captioned before the barrier
            return out
        wanted = {i: image_paths[i] for ids in splits.values() for i in ids if i in image_paths}
        self.log(f"captioning {len(wanted)} images with {caption.backend} {caption.model or ''}")
        try:
            model = expand_path(caption.model) if caption.model and "$" in caption.model else caption.model
            captioner = build_captioner(caption.backend, model, load_vocabulary(None), **caption.options)
        except TypeError as exc:
            raise DataError(
                f"recipe caption.options {caption.options} do not fit the {caption.backend} backend: {exc}"
            ) from None
        attributes = run_captioning(wanted, captioner, self.out / "captions", max_attempts=caption.max_attempts)
        write_attributes(out, attributes)
        failures = {
            i: f"image file not found in {images}" for ids in splits.values() for i in ids if i not in image_paths
        }
        failures.update(
            {
                i: record.get("error") or record.get("status", "failed")
                for i, record in read_json(summary_path(self.out / "captions", captioner), "captioning summary")
                .get("failures", {})
                .items()
            }
        )
        if failures:
            first = next(iter(failures.items()))
            self.log(
                f"captioning: {len(failures)} images without attributes (first: {first[0]}: {first[1]}); "
                f"the list is in {summary_path(self.out / 'captions', captioner)}"
            )
        check_failures(
            failures,
            len(wanted) + sum(i not in image_paths for ids in splits.values() for i in ids),
            caption.max_failed_share,
            "images",
        )
        return out

    def towers(self, catalog: ClothingCatalog):
        spec = self.recipe.towers
        if spec.align is None:
            return create_backbone(spec.backbone, preprocess=spec.preprocess)
        from ..training.align import align_offline_backbone

        backbone, summary = align_offline_backbone(
            catalog, self.out / "offline-backbone", self.cache, spec.align, progress=True, towers_spec=spec.backbone
        )
        self.log(
            ("reusing the aligned offline backbone" if summary.get("reused") else "aligned the offline backbone")
            + f" (val image->text R@10 {summary['best_val_image_to_text_R@10']:.1f})"
        )
        return backbone

    def generated_triplets(self, model: CIRModel, catalog: ClothingCatalog, split: str) -> list[dict]:
        """Triplets mined within ``split`` from the MLLM attributes; the file records its settings and
        inputs and is reused while they stay the same."""
        from ..triplets import generate_triplets, write_triplets

        config = self.recipe.generate[split]
        path = self.out / "triplets" / f"{split}.json"
        key = text_sha1(
            model.backbone.image_fingerprint(),
            config.model_dump_json(),
            *(f"{i}:{catalog.attributes.get(i, {}).get('description', '')}" for i in catalog.splits[split]),
        )
        stats_file = path.with_suffix(".stats.json")
        if path.is_file() and stats_file.is_file() and read_json(stats_file, "triplet stats").get("inputs_sha1") == key:
            return read_json(path, "generated triplets")
        if not catalog.attributes or catalog.attributes_file is None:
            raise DataError(
                "recipe 'generate' needs the catalog's MLLM attributes: set catalog.attributes or a caption step"
            )
        from ..captioning import load_precomputed

        attributes = load_precomputed(catalog.attributes_file)
        paths = {i: p for i, p in catalog.split_paths(split).items() if i in attributes}
        ids, features = self.cache.encode(model.backbone, paths, on_error="skip", progress=True)
        generated, stats = generate_triplets(attributes, features, ids, config, train_ids=ids)
        write_triplets(path, generated, {**stats, "inputs_sha1": key}, config)
        self.log(f"generated {len(generated)} {split} triplets from {len(ids)} images")
        return read_json(path, "generated triplets")

    def load_source(self, source: TripletSource, split: str) -> TripletSet:
        """An annotated set restricted to the (possibly sliced) catalog split."""
        loaded = load_triplet_set(
            expand_path(source.captions),
            expand_path(source.split),
            Path(expand_path(self.recipe.catalog.images)),
            name=source_name(source),
        )
        allowed = set(self.catalog_.splits.get(split, []))
        loaded.image_paths = {**self.catalog_.image_paths, **loaded.image_paths}  # for whole-catalog galleries
        loaded.gallery_ids = [i for i in loaded.gallery_ids if i in allowed]
        loaded.triplets = [t for t in loaded.triplets if t.candidate in allowed and t.target in allowed]
        return loaded

    def all_ids(self) -> list[str]:
        return [i for ids in self.catalog_.splits.values() for i in ids if i in self.catalog_.image_paths]

    def evaluator(self) -> Evaluator:
        """The val sets under the recipe's protocols: ``split`` (gallery = the val split, reference
        kept, as FashionIQ) and ``catalog`` (gallery = every split, reference removed, as the service)."""
        spec = self.recipe.evaluation
        sets = {source_name(s): self.load_source(s, "val") for s in spec.val}
        if spec.generated_val and "val" in self.generated:
            triplets = [
                t
                for t in parse_triplets(self.generated["val"], GENERATED_VAL)
                if t.candidate in self.catalog_.image_paths and t.target in self.catalog_.image_paths
            ]
            sets[GENERATED_VAL] = TripletSet(
                GENERATED_VAL, triplets, list(self.catalog_.split_paths("val")), dict(self.catalog_.image_paths), [], 0
            )
        protocols = [SPLIT if p == "split" else catalog_protocol(self.all_ids()) for p in spec.protocols]
        options = EvalOptions(ks=KS, progress=False, keep_ranks=True)
        return Evaluator(
            sets, self.cache, self.catalog_.attributes, options, spec.selection, self.out / "evaluations", protocols
        )

    # -- scoring ----------------------------------------------------------------------------------
    def score(
        self,
        label: str,
        model: CIRModel,
        modes: tuple[str, ...] | None = None,
        describe: str = "catalog",
        reliance: bool | None = None,
    ) -> dict:
        """Rows (with 95% intervals and, with reliance, the drop with shuffled references) for
        ``model`` under every protocol; returns the evaluator's report."""
        reliance = self.recipe.evaluation.reliance if reliance is None else reliance
        report = self.evaluator_(model, modes, describe, reliance=reliance)
        for protocol, by_mode in report.items():
            for mode, table in by_mode.items():
                for set_name, metrics in table.items():
                    if set_name == "average":
                        continue
                    key = f"{label}/{mode}|{protocol}|{set_name}"
                    self.ranks[key] = metrics["ranks"]
                    row = {
                        "stage": label,
                        "mode": mode,
                        "protocol": protocol,
                        "set": set_name,
                        **{f"R@{k}": metrics[f"R@{k}"] for k in KS},
                        **{f"R@{k}_ci": recall_interval(metrics["ranks"], k)[1:] for k in (10, 50)},
                        "n_queries": metrics["n_queries"],
                        "n_gallery": metrics["n_gallery"],
                    }
                    if "ranks_shuffled" in metrics:
                        self.ranks[key + "|shuffled"] = metrics["ranks_shuffled"]
                        row["reliance"], *row["reliance_ci"] = paired_difference(
                            metrics["ranks"], metrics["ranks_shuffled"], 10
                        )
                    self.rows.append(row)
        return report

    def selection_figure(self, model: CIRModel, mode: str | None = None) -> float:
        """The selection figure of ``model`` in ``mode`` (default: its own)."""
        mode = mode or model.query_mode
        return self.evaluator_.figure(self.evaluator_(model, (mode,)), mode)

    def random_rows(self) -> None:
        """Expected recall of a random ranking: K / gallery size (one fewer with the reference removed)."""
        for protocol in self.evaluator_.protocols:
            for set_name, triplet_set in self.evaluator_.sets.items():
                g = len(protocol.gallery_ids or triplet_set.gallery_ids) - protocol.remove_reference
                self.rows.append(
                    {
                        "stage": "random",
                        "mode": "-",
                        "protocol": protocol.name,
                        "set": set_name,
                        **{f"R@{k}": 100.0 * min(k, g) / max(g, 1) for k in KS},
                        "n_queries": len(triplet_set.triplets),
                        "n_gallery": g,
                    }
                )

    # -- models -----------------------------------------------------------------------------------
    def new_model(self, backbone, text_template: str, reads_items: bool) -> CIRModel:
        spec = self.recipe.model
        combiner = None
        if spec.combiner:
            from ..models.combiner import Combiner

            combiner = Combiner(backbone.feature_dim)
        matcher = None
        if reads_items and spec.matcher and spec.matcher.spec == "backbone":
            if not hasattr(backbone, "text_tower"):
                raise DataError(
                    "recipe model.matcher.spec 'backbone' shares the offline towers' text tower; "
                    f"{backbone.spec} has none: name a sentence encoder (minilm, mpnet, hf:DIR)"
                )
            matcher = DescriptionMatcher(backbone.towers.text, query_encoder=backbone.text_tower)
        elif reads_items and spec.matcher:
            matcher = DescriptionMatcher(spec.matcher.spec)
        space = AttributeSpace() if reads_items and spec.attributes else None
        model = CIRModel(
            backbone, spec.query_mode, combiner, text_template=text_template, matcher=matcher, attribute_space=space
        )
        model.descriptions_source = (
            str(self.catalog_.attributes_file.resolve()) if self.catalog_.attributes_file else None
        )
        return model

    def fit_fusion(self, model: CIRModel) -> None:
        """The model's fusion weights, fitted on the annotated training captions (gallery: the train
        split, reference left out) and kept in ``fusion/<fingerprint>.json``."""
        from ..training.fusion import fit_fusion

        spec = self.recipe.fusion
        sources = [s for s in self.recipe.annotated if spec.sets is None or source_name(s) in spec.sets]
        if not sources:
            raise DataError("recipe: a fused baseline needs annotated training captions to fit on")
        sets = {source_name(s): self.load_source(s, "train") for s in sources}
        train = Protocol("train", tuple(self.catalog_.splits.get("train", [])), remove_reference=True)
        fitter = Evaluator(sets, self.cache, self.catalog_.attributes, EvalOptions(progress=False), None, None, [train])
        key = text_sha1(model.fingerprint(), fitter.key, spec.config.model_dump_json())
        path = self.out / "fusion" / f"{key}.json"
        if path.is_file():
            from ..models.fusion import Fusion

            model.fusion = Fusion.from_dict(read_json(path, "fitted fusion")["fusion"], str(path))
            return
        fusion, summary = fit_fusion(fitter.prepare(model, all_terms=True), "train", spec.config)
        model.fusion = fusion
        write_json(path, {"fusion": fusion.model_dump(mode="json"), **summary})
        self.log(
            f"fusion fitted on {summary['queries']} training captions ({summary['terms']} terms): "
            f"loss {summary['loss_plain_composed']} -> {summary['loss']}"
        )

    def baseline(self, spec: BaselineSpec, backbone) -> Path:
        """Every variant x mode scored; the best (on the selection figure) is published."""
        scores, choices = {}, {}
        for variant in spec.variants:
            model = self.new_model(backbone, variant.text_template, spec.matcher)
            if spec.fused:
                self.fit_fusion(model)
            self.score(
                variant.label, model, tuple(variant.modes), reliance=spec.matcher and self.recipe.evaluation.reliance
            )
            for mode in variant.modes:
                scores[f"{variant.label}/{mode}"] = self.selection_figure(model, mode)
                choices[f"{variant.label}/{mode}"] = (model, mode)
        self.labels[spec.name] = Selection.best(scores)
        model, mode = choices[self.labels[spec.name]]
        model.query_mode = mode
        self.log(f"{spec.name}: best variant {self.labels[spec.name]}")
        folder = self.out / spec.name
        model.save(folder, {"stage": spec.name})
        return folder

    def stage_triplets(self, stage: StageSpec) -> list[Triplet]:
        triplets: list[Triplet] = []
        train_ids = set(self.catalog_.splits.get("train", []))
        if "annotated" in stage.data:
            for source in self.recipe.annotated:
                triplets += self.load_source(source, "train").triplets
        if "generated" in stage.data:
            for source in self.recipe.generated:
                triplets += self.load_source(source, "train").triplets
            if "train" in self.generated:
                triplets += parse_triplets(self.generated["train"], "generated train triplets")
        return [t for t in triplets if t.candidate in train_ids and t.target in train_ids]

    def train_stage(self, stage: StageSpec, start: Path) -> Path:
        """Train ``stage`` from the published model ``start`` into ``train/<name>`` (the training
        checkpoint resumes it; other inputs start it over), then publish it."""
        from ..training import train_stage

        triplets = self.stage_triplets(stage)
        model = CIRModel.load(start)
        batch = max(2, min(stage.train_config().batch_size, len(triplets) // 2 * 2))  # small slices
        config = stage.train_config(batch_size=batch, cache_dir=str(self.cache.root), progress=True)
        run_dir = self.out / "train" / stage.name
        inputs = {
            "start": model.fingerprint(),
            "triplets": text_sha1(*(f"{t.candidate}>{t.target}:{'|'.join(t.captions)}" for t in triplets)),
            "config": {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE_FIELDS},
            "selection": self.recipe.evaluation.selection.model_dump(mode="json"),
        }
        inputs_file = run_dir / "inputs.json"
        if self.is_main and inputs_file.is_file() and read_json(inputs_file, "stage inputs") != inputs:
            self.log(f"{stage.name}: its start model, triplets or settings changed; training it again")
            shutil.rmtree(run_dir)
        self.barrier()
        if self.is_main:
            write_json(inputs_file, inputs)
        self.log(f"{stage.name}: {len(triplets)} triplets, {config.epochs} epoch(s), batch {config.batch_size}")
        # a stage whose fusion is fitted again afterwards keeps its last epoch: scores under the start
        # model's fusion would pick nothing the published model has
        evaluator = self.evaluator_ if self.is_main and not stage.refit_fusion else None
        train_stage(
            config, model, triplets, self.catalog_.split_paths("train"), evaluator, self.catalog_.attributes, run_dir
        )
        if self.is_main:
            best = run_dir / "best" if (run_dir / "best" / "model.json").is_file() else run_dir / "model"
            publish_model(best, self.out / stage.name)
            if stage.refit_fusion:
                trained = CIRModel.load(self.out / stage.name)
                self.fit_fusion(trained)
                trained.save(self.out / stage.name, {"stage": stage.name})
            from .pictures import stage_curves

            stage_curves([run_dir / "metrics.jsonl"], run_dir / "curve.png")
            self.labels[stage.name] = f"{stage.name}/{model.query_mode}"
        self.barrier()  # the next stage may start from this one on every rank
        return self.out / stage.name

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        recipe = self.recipe
        self.out.mkdir(parents=True, exist_ok=True)
        with self.step("catalog"):
            if self.is_main:
                self.record_run()
                self.catalog_ = self.catalog()
            self.barrier()
            if not self.is_main:
                self.catalog_ = self.catalog()
        with self.step("image features and towers"):
            backbone = self.towers(self.catalog_)
            self.cache.encode(
                backbone, {i: self.catalog_.image_paths[i] for i in self.all_ids()}, on_error="skip", progress=True
            )
        with self.step("triplets"):
            plain = CIRModel(backbone, query_mode=recipe.model.query_mode)
            self.generated = {split: self.generated_triplets(plain, self.catalog_, split) for split in recipe.generate}
        self.evaluator_ = self.evaluator()
        published: dict[str, Path] = {}
        if self.is_main:
            self.random_rows()
            for spec in recipe.baselines:
                with self.step(f"baseline {spec.name}"):
                    published[spec.name] = self.baseline(spec, backbone)
        self.barrier()
        published.update({spec.name: self.out / spec.name for spec in recipe.baselines})
        for stage in recipe.stages:
            with self.step(f"train {stage.name}"):
                published[stage.name] = self.train_stage(stage, published[stage.start])
            if self.is_main:
                with self.step(f"score {stage.name}"):
                    self.score(stage.name, CIRModel.load(published[stage.name]))
        if not self.is_main:
            return {}
        return self.finish(published)

    def finish(self, published: dict[str, Path]) -> dict:
        recipe = self.recipe
        with self.step("select"):
            scores = {name: self.selection_figure(CIRModel.load(folder)) for name, folder in published.items()}
            best = Selection.best(scores)
            publish_model(published[best], self.out / "best")
            write_json(
                self.out / "best" / "selected.json",
                {"stage": best, "scores": scores, "selection": recipe.evaluation.selection.model_dump(mode="json")},
            )
            self.log(f"best on val: {best} ({recipe.evaluation.selection.metric} {scores[best]:.2f})")
        if recipe.attribute_heads:
            with self.step("attribute heads"):
                self.attribute_heads()
        baselines = [b.name for b in recipe.baselines]
        best_baseline = Selection.best({b: scores[b] for b in baselines}) if baselines else None
        pairs = [
            (best_baseline if a == "best-baseline" else a, best_baseline if b == "best-baseline" else b)
            for a, b in recipe.evaluation.compare
        ]
        table = self.table()
        differences = self.differences(
            [(self.labels[a], self.labels[b]) for a, b in pairs if a in self.labels and b in self.labels]
        )
        atomic_write_text(
            self.out / "results.md", table + "\n\nPaired differences (R@10, R@50):\n\n" + differences + "\n"
        )
        write_json(
            self.out / "results.json",
            {
                "rows": self.rows,
                "best": best,
                "labels": self.labels,
                "seconds": time.perf_counter() - self.started,
                "ranks": self.ranks,
            },
        )
        print("\nResults (val):\n" + table + "\n\nPaired differences:\n" + differences, flush=True)
        if recipe.pictures:
            with self.step("pictures"):
                self.pictures()
        if recipe.index is not None:
            with self.step("index"):
                self.build_index(recipe.index)
        self.write_timings()
        if self.serve and recipe.index is not None:
            from ..serving.app import serve

            print(f"\nServing the catalog at http://127.0.0.1:{self.port}/  (Ctrl+C to stop)", flush=True)
            serve(self.out / "index", CIRModel.load(self.out / "best"), host="127.0.0.1", port=self.port)
        return {"rows": self.rows, "best": best}

    def write_timings(self) -> None:
        total = time.perf_counter() - self.started
        write_json(
            self.out / "timings.json",
            {"steps": self.timings, "total_seconds": round(total, 1), "peak_rss_mb": round(peak_rss_mb())},
        )
        lines = [f"  {t['step']:<40}{t['seconds']:>8.0f} s" for t in self.timings]
        print(
            "\nTime per step:\n" + "\n".join(lines) + f"\n  {'total':<40}{total:>8.0f} s  (peak RSS "
            f"{peak_rss_mb():.0f} MB; timings.json)",
            flush=True,
        )

    def attribute_heads(self) -> None:
        from ..models.attributes import load_heads
        from ..training.attribute_heads import fit_attribute_heads, format_report

        best = CIRModel.load(self.out / "best")
        # heads see image features only: reused while the image tower and the train/val attributes stay
        key = text_sha1(
            best.backbone.image_fingerprint(),
            *(
                json.dumps(self.catalog_.attributes.get(i), sort_keys=True)
                for s in ("train", "val")
                for i in self.catalog_.splits.get(s, [])
            ),
        )
        heads = load_heads(self.out / "attribute-heads")
        reused = heads is not None and heads.info.get("inputs_sha1") == key
        if heads is None or not reused:
            heads = fit_attribute_heads(best, self.catalog_, self.cache)
            heads.info["inputs_sha1"] = key
            heads.save(self.out / "attribute-heads")
        best.attach_heads(heads)
        heads.save(self.out / "best")
        atomic_write_text(self.out / "attributes.md", format_report(heads) + "\n")
        val = heads.info["val"]
        self.log(
            f"attribute heads ({'reused' if reused else 'trained'}) on val: mean accuracy "
            f"{sum(r['accuracy'] for r in val.values()) / len(val):.1f}% (majority class "
            f"{sum(r['majority_accuracy'] for r in val.values()) / len(val):.1f}%); table in attributes.md"
        )
        self.score("best-predicted-prompt", best, (best.query_mode,), describe="predicted")

    def table(self) -> str:
        header = (
            "| model | mode | protocol | set | "
            + " | ".join(f"R@{k}" for k in KS)
            + " | R@10 95% CI | R@50 95% CI | reliance (R@10 true - shuffled, 95% CI) | queries | gallery |"
        )
        lines = [header, "|" + "---|" * (len(KS) + 9)]
        order = list(self.evaluator_.sets)
        protocols = [p.name for p in self.evaluator_.protocols]
        for row in sorted(self.rows, key=lambda r: (protocols.index(r["protocol"]), order.index(r["set"]))):
            ci = [
                f"{row[f'R@{k}_ci'][0]:.1f}-{row[f'R@{k}_ci'][1]:.1f}" if f"R@{k}_ci" in row else "-" for k in (10, 50)
            ]
            reliance = (
                f"{row['reliance']:+.1f} ({row['reliance_ci'][0]:+.1f} to {row['reliance_ci'][1]:+.1f})"
                if "reliance" in row
                else "-"
            )
            lines.append(
                f"| {row['stage']} | {row['mode']} | {row['protocol']} | {row['set']} | "
                + " | ".join(f"{row[f'R@{k}']:.2f}" for k in KS)
                + f" | {ci[0]} | {ci[1]} | {reliance} | {row['n_queries']} | {row['n_gallery']} |"
            )
        return "\n".join(lines)

    def differences(self, pairs: list[tuple[str, str]]) -> str:
        """Paired bootstrap differences (R@10, R@50) on the same queries, per protocol and val set."""
        lines = ["| comparison | protocol | set | R@10 diff (95% CI) | R@50 diff (95% CI) |", "|---|---|---|---|---|"]
        for a, b in pairs:
            for protocol in self.evaluator_.protocols:
                for set_name in self.evaluator_.sets:
                    ra = self.ranks.get(f"{a}|{protocol.name}|{set_name}")
                    rb = self.ranks.get(f"{b}|{protocol.name}|{set_name}")
                    if ra is None or rb is None:
                        continue
                    cells = [paired_difference(ra, rb, k) for k in (10, 50)]
                    lines.append(
                        f"| {a} - {b} | {protocol.name} | {set_name} | "
                        + " | ".join(f"{d:+.1f} ({lo:+.1f} to {hi:+.1f})" for d, lo, hi in cells)
                        + " |"
                    )
        return "\n".join(lines)

    def pictures(self) -> None:
        from .pictures import example_picture, stage_curves, triplet_picture

        best = CIRModel.load(self.out / "best")
        for name, triplet_set in self.evaluator_.sets.items():
            out = self.out / f"examples-{name}.png"
            self.log(
                f"example queries: {example_picture(best, triplet_set, self.catalog_.attributes, self.cache, out)}"
            )
        if "train" in self.generated and self.generated["train"]:
            self.log(
                f"example triplets: {triplet_picture(self.generated['train'], self.catalog_.image_paths, self.out / 'triplets.png')}"
            )
        curves = [self.out / "train" / s.name / "metrics.jsonl" for s in self.recipe.stages]
        if any(c.is_file() for c in curves):
            self.log(f"training curves: {stage_curves(curves, self.out / 'training.png')}")

    def build_index(self, spec: IndexSpec) -> None:
        from ..retrieval.index import build_index

        paths = {i: p for s in spec.splits for i, p in self.catalog_.split_paths(s).items()}
        metadata = {
            i: {k: v for k, v in self.catalog_.attributes.get(i, {}).items() if k != "image"}
            | ({"label": self.catalog_.labels[i]} if i in self.catalog_.labels else {})
            for i in paths
        }
        best = CIRModel.load(self.out / "best")
        index = build_index(
            self.out / "index",
            best,
            paths,
            metadata,
            factory=spec.factory,
            cache_dir=self.cache.root,
            overwrite=True,
            progress=True,
        )
        self.log(f"index: {len(index)} catalog images in {self.out / 'index'}")


def source_name(source: TripletSource) -> str:
    return source.name or Path(source.captions).stem


def run_recipe(recipe: Recipe, source: str = "recipe", serve: bool = False, port: int = 8000) -> dict:
    return Runner(recipe, source, serve, port).run()
