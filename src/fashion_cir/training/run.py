"""Run both training stages from one JSON file (works under torchrun):

    python -m fashion_cir.training.run --config configs/fashioniq_vitb32.json [--stage 1|2|all] [--out DIR]
    torchrun --nproc_per_node 4 -m fashion_cir.training.run --config configs/fashioniq_vitb32.json

Paths in the file may use environment variables (``${FASHIONIQ_ROOT}``). Stage 1 writes
``<out>/stage1/{model,best,checkpoint.pt,metrics.jsonl,config.json}``; stage 2 starts from
``<out>/stage1/<stage2_from>`` and writes ``<out>/stage2/...``. Rerunning resumes."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from pydantic import Field

from ..data.catalog import read_descriptions
from ..data.triplets import Triplet, TripletSet, load_triplet_set
from ..errors import FashionCIRError
from ..models.cir import QUERY_MODES, CIRModel
from ..models.combiner import Combiner
from ..models.factory import DEFAULT_BACKBONE, create_backbone
from .config import Stage1Config, Stage2Config, _Config
from .loop import TrainingStopped
from .stage1 import train_stage1
from .stage2 import train_stage2

EXIT_STOPPED = 75


class TripletSource(_Config):
    """A FashionIQ-format caption file with its image split and images folder."""

    captions: str
    split: str
    images: str
    name: str | None = None

    def load(self) -> TripletSet:
        return load_triplet_set(expand_path(self.captions), expand_path(self.split), expand_path(self.images), name=self.name)


class RunConfig(_Config):
    """Model, data and both stages' settings."""

    out_dir: str = "runs/train"
    backbone: str = DEFAULT_BACKBONE
    preprocess: Literal["clip", "targetpad"] = "clip"
    query_mode: str = Field("sum_raw", description=f"one of {QUERY_MODES}")
    text_template: Literal["prompt", "caption"] = "prompt"
    combiner: bool = Field(False, description="add a Combiner head (use with query_mode 'combiner')")
    descriptions: str | None = Field(None, description="JSONL with 'image' and 'description' (attributes.jsonl format)")
    train: list[TripletSource] = Field(description="annotated triplets and their training catalogs")
    generated: list[TripletSource] = Field(default_factory=list, description="generated triplets (mixed per annotated_ratio)")
    val: list[TripletSource] = Field(default_factory=list)
    max_train_triplets: int | None = Field(None, ge=1, description="first N triplets of each training file (smoke runs)")
    stage1: Stage1Config | None = None
    stage2: Stage2Config | None = None
    stage2_from: Literal["best", "model"] = "best"


def expand_path(path: str) -> str:
    """``~`` and environment variables expanded; an unset variable is an error that names it."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise FashionCIRError(f"path {path!r} uses unset environment variable(s) {', '.join(unset)}; export them first")
    return expanded


def load_training_data(config: RunConfig) -> tuple[list[Triplet], dict[str, Path], dict[str, TripletSet]]:
    """Training triplets (annotated, then generated), the training catalog's image paths, val sets."""
    triplets: list[Triplet] = []
    image_paths: dict[str, Path] = {}
    for source in [*config.train, *config.generated]:
        loaded = source.load()
        triplets += loaded.triplets[: config.max_train_triplets]
        image_paths.update(loaded.image_paths)
    val_sets = {}
    for source in config.val:
        loaded = source.load()
        val_sets[loaded.name] = loaded
    return triplets, image_paths, val_sets


def build_model(config: RunConfig) -> CIRModel:
    backbone = create_backbone(config.backbone, preprocess=config.preprocess)
    combiner = Combiner(backbone.feature_dim) if config.combiner else None
    return CIRModel(backbone, config.query_mode, combiner, text_template=config.text_template)


def run(config: RunConfig, stage: str = "all") -> Path:
    """Train the configured stages; returns the folder of the last model written."""
    out = Path(config.out_dir)
    triplets, image_paths, val_sets = load_training_data(config)
    descriptions = read_descriptions(expand_path(config.descriptions)) if config.descriptions else {}
    result = None
    if stage in ("1", "all") and config.stage1 is not None:
        stage1 = config.stage1.model_copy(update={"cache_dir": config.stage1.cache_dir or str(out / "cache")})
        train_stage1(stage1, build_model(config), triplets, image_paths, val_sets, descriptions, out / "stage1")
        result = out / "stage1" / "model"
    if stage in ("2", "all") and config.stage2 is not None:
        source = out / "stage1" / config.stage2_from
        if (source / "model.json").is_file():
            model = CIRModel.load(source)
        elif config.stage1 is not None:
            raise FashionCIRError(f"stage 2 starts from the stage-1 model in {source}, which does not exist yet: "
                                  "run stage 1 first (--stage 1 or --stage all)")
        else:
            model = build_model(config)
        stage2 = config.stage2.model_copy(update={"cache_dir": config.stage2.cache_dir or str(out / "cache")})
        train_stage2(stage2, model, triplets, image_paths, val_sets, descriptions, out / "stage2")
        result = out / "stage2" / "model"
    if result is None:
        raise FashionCIRError(f"nothing to run: stage {stage!r} is not configured")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fashion_cir.training.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="RunConfig JSON file")
    parser.add_argument("--stage", choices=("1", "2", "all"), default="all")
    parser.add_argument("--out", help="override out_dir")
    args = parser.parse_args(argv)
    code = 0
    try:
        config = RunConfig.from_json(args.config)
        if args.out:
            config = config.model_copy(update={"out_dir": args.out})
        folder = run(config, args.stage)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"trained model: {folder}")
    except TrainingStopped as exc:
        print(exc, file=sys.stderr)
        code = EXIT_STOPPED
    except FashionCIRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
