"""Stage 2 (SPN4CIR static representations): the image encoder is frozen and the whole training
catalog is encoded ONCE into a bank; the text encoder and/or Combiner are trained with InfoNCE of
``compose(bank[reference], text)`` against the ENTIRE bank, so each query sees every catalog image
as a negative for the cost of one matrix product. Every rank holds the same bank and computes its
own queries' loss; DDP averages the gradients."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FashionCIRError
from ..features.cache import FeatureCache
from ..models.cir import CIRModel
from ..retrieval.policy import item_parts
from .config import Stage2Config
from .data import Collate, TripletExamples, training_triplets
from .distributed import shared_image_features
from .loop import StageSetup, StageStart
from .losses import BankInfoNCELoss, duplicate_groups
from .stage1 import ItemTables, query_parts, set_trainable


class StaticBank(nn.Module):
    """The catalog from the frozen encoders: image features ``raw`` [N, d] (references are composed
    from these, as at evaluation), the item side ``tables`` (descriptions, attributes), the item
    vectors ``items`` and duplicate ``groups`` (identical image rows)."""

    raw: torch.Tensor
    items: torch.Tensor
    groups: torch.Tensor

    def __init__(self, model: CIRModel, ids: list[str], raw: torch.Tensor, tables: ItemTables | None = None):
        super().__init__()
        self.ids = ids
        self.index = {image_id: i for i, image_id in enumerate(ids)}
        self.tables = tables or ItemTables(None, None)
        self.register_buffer("raw", raw, persistent=False)
        with torch.no_grad():
            items = self.tables.items(model, raw, torch.arange(len(ids)))
        self.register_buffer("items", items, persistent=False)
        self.register_buffer("groups", duplicate_groups(raw), persistent=False)

    @property
    def duplicates(self) -> int:
        """Rows that are exact copies of an earlier row."""
        return len(self.ids) - int(self.groups.unique().numel())


class Stage2Step(nn.Module):
    """One micro-batch -> (local InfoNCE loss against the whole bank, the same value to report)."""

    def __init__(self, model: CIRModel, bank: StaticBank, loss: BankInfoNCELoss):
        super().__init__()
        self.model = model
        self.bank = bank
        self.loss = loss

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        parts = query_parts(self.model, batch, self.bank.raw[batch["reference_ids"]], self.bank.tables.descriptions)
        queries = self.model.query_vectors(parts)
        hard = batch.get("hard_ids")
        hard = hard.view(len(queries), -1) if hard is not None and hard.numel() else None
        loss = self.loss(queries, self.bank.items, batch["target_ids"], self.bank.groups, hard)
        return loss, loss.detach()


def build_bank(
    model: CIRModel,
    image_paths: dict[str, Path],
    cache: FeatureCache,
    config: Stage2Config,
    ctx,
    records: Mapping[str, Mapping[str, Any]] | None = None,
) -> StaticBank:
    """Encode (or reuse from the cache) every catalog image with the model's image encoder, and
    each item's description and attributes as the model reads them."""
    ids, features = shared_image_features(
        model.backbone, image_paths, cache, ctx, config.eval_batch_size, config.num_workers, config.progress
    )
    if not ids:
        raise FashionCIRError("stage2: no catalog image could be encoded for the bank")
    return StaticBank(model, ids, features.float(), ItemTables(*item_parts(model, ids, records, cache.root)))


def prepare_stage2(config: Stage2Config, start: StageStart) -> StageSetup:
    """Stage 2 (see :func:`fashion_cir.training.stages.train_stage`): the text encoder
    (``encoders='text'``) and/or Combiner of the model (normally the stage-1 model) against a static
    bank of every image in ``start.image_paths`` (the training catalog)."""
    model, image_paths, records, ctx, out_dir = start.model, start.image_paths, start.records, start.ctx, start.out_dir
    train_triplets = start.triplets
    set_trainable(
        model,
        ["text"] if config.encoders == "text" else [],
        config.last_n_blocks,
        config.train_combiner,
        config.train_matcher,
    )
    model.to(ctx.device)
    bank = build_bank(model, image_paths, FeatureCache(config.cache_dir or out_dir / "cache"), config, ctx, records)
    usable = [t for t in train_triplets if t.candidate in bank.index and t.target in bank.index]
    plan = training_triplets("stage2", usable, len(train_triplets), config)
    hard = config.hard_negatives_per_query
    dataset = TripletExamples(model, plan.triplets, {i: image_paths[i] for i in bank.ids}, records, config.seed, hard)
    collate = Collate(model, bank.index, hard)
    step_module = Stage2Step(model, bank, BankInfoNCELoss(config.temperature, config.hard_negative_weight))
    summary = {
        "bank_size": len(bank.ids),
        "bank_duplicate_rows": bank.duplicates,
        "negatives_per_query": len(bank.ids) - 1,
    }
    return StageSetup("stage2", step_module, plan, (dataset, collate), False, summary)
