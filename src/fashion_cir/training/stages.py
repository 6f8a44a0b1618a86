"""Training one stage: stage 1 (CLIP4Cir, in-batch + hard negatives, :mod:`.stage1`) or stage 2
(SPN4CIR, static-representation bank negatives, :mod:`.stage2`), told apart by the config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data.triplets import Triplet
from ..evaluation.evaluator import Evaluator
from ..models.cir import CIRModel
from .config import Stage1Config, Stage2Config
from .loop import StageStart, fit_stage, start_stage
from .stage1 import prepare_stage1
from .stage2 import prepare_stage2


def train_stage(
    config: Stage1Config | Stage2Config,
    model: CIRModel,
    train_triplets: list[Triplet],
    image_paths: dict[str, Path],
    evaluator: Evaluator | None,
    records: Mapping[str, Mapping[str, Any]] | None,
    out_dir: str | Path,
) -> CIRModel:
    """Fine-tune ``model`` on ``train_triplets`` as ``config`` says (a Stage1Config: stage 1, a
    Stage2Config: stage 2); ``image_paths`` holds the images they use, ``records`` the catalog's
    descriptions and attributes. Validates each epoch with ``evaluator`` (None: the last epoch is
    kept), keeps ``<out>/best``, checkpoints to ``<out>/checkpoint.pt`` (resumed automatically) and
    writes the final model to ``<out>/model``. Works under torchrun (DDP). Returns the trained
    model (final weights)."""
    ctx, out = start_stage(config, out_dir)
    start = StageStart(model, train_triplets, image_paths, records, ctx, out)
    setup = prepare_stage1(config, start) if isinstance(config, Stage1Config) else prepare_stage2(config, start)
    return fit_stage(config, start, setup, evaluator)
