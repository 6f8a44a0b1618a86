"""Stage 1 (CLIP4Cir): contrastive fine-tuning of CLIP's encoders for composed queries.

query = model.compose(image(reference), text(prompt + caption)), target = normalize(image(target));
cross-entropy over ``scale * q @ [targets; hard negatives].T`` across the GLOBAL micro-batch (features
are gathered over ranks, so N GPUs train exactly like one GPU with the same batch). When the image
encoder is frozen its features come from the FeatureCache instead of being recomputed each step; when
only its head trains (``offline+blocksN``), the cached trunk features go through the head each step."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import readable_images
from ..features.cache import FeatureCache
from ..models.cir import CIRModel
from ..models.fusion import QueryParts
from ..models.sentence_encoder import mean_pool
from ..retrieval.policy import item_parts
from .config import Stage1Config
from .data import Collate, TripletExamples, training_triplets
from .distributed import DistContext, gather_with_local_grad, shared_image_features
from .loop import StageSetup, StageStart
from .losses import InBatchContrastiveLoss

ENCODER_CHOICES = {"text": ["text"], "image": ["image"], "both": ["image", "text"]}


def set_trainable(
    model: CIRModel, encoders: list[str], last_n_blocks: int | None, train_combiner: bool, train_matcher: bool = True
) -> None:
    """Freeze everything but ``encoders`` (optionally their last N blocks), the Combiner and the
    matcher's query encoder; record the trained backbone prefixes on the model so that ``model.save``
    writes those weights. The Combiner trains only when the model composes queries with it."""
    model.backbone.set_trainable(encoders, last_n_blocks)
    if model.combiner is not None:
        model.combiner.requires_grad_(train_combiner and model.query_mode == "combiner")
    if model.matcher is not None and not model.matcher.shared:  # a shared one trains as the text tower
        model.matcher.set_trainable(train_matcher, last_n_blocks)
        model.matcher_trained = model.matcher_trained or train_matcher
    model.mark_trained([f"backbone.{p}" for e in encoders for p in model.backbone.trainable_prefixes(e, last_n_blocks)])


def query_parts(
    model: CIRModel, batch: dict, reference: torch.Tensor, description_table: torch.Tensor | None
) -> QueryParts:
    """A training batch's query parts, with gradients through the text encoders that train."""
    matcher = model.matcher
    parts = QueryParts(reference, None, attributes=batch.get("attributes"))
    if model.shares_text:
        pooled = mean_pool(cast(nn.Module, model.backbone.text_tower), batch["tokens"])  # shares_text: it has one
        parts.text, parts.prompt = model.backbone.project_text(pooled), F.normalize(pooled, dim=-1)
    else:
        parts.text = model.backbone.encode_texts(batch["tokens"])
    if matcher is not None:
        for term in ("caption", "prompt"):
            if f"{term}_tokens" in batch:
                setattr(parts, term, matcher.encode_queries(batch[f"{term}_tokens"]))
        if description_table is not None and model.needs("reference_description", model.fusion):
            parts.reference_description = description_table[batch["reference_ids"]]
    return parts


class ItemTables(nn.Module):
    """The item side of the images training touches (rows = integer image ids): description
    features and attribute one-hots, as the model reads items."""

    descriptions: torch.Tensor | None
    attributes: torch.Tensor | None

    def __init__(self, descriptions: torch.Tensor | None, attributes: torch.Tensor | None):
        super().__init__()
        self.register_buffer("descriptions", descriptions, persistent=False)
        self.register_buffer("attributes", attributes, persistent=False)

    def items(self, model: CIRModel, image_features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors of images with integer ids (-1 = padding: any row, masked by the loss)."""
        rows = ids.clamp(min=0)

        def pick(table: torch.Tensor | None) -> torch.Tensor | None:
            return None if table is None else table[rows]

        return model.item_vectors(image_features, pick(self.descriptions), pick(self.attributes))


class Stage1Step(nn.Module):
    """One micro-batch -> (loss * world_size for backward, loss). Image features come from
    ``image_table`` (rows = integer image ids) when given, else from the pixels in the batch."""

    image_table: torch.Tensor | None

    def __init__(
        self,
        model: CIRModel,
        loss: InBatchContrastiveLoss,
        ctx: DistContext,
        hard_per_query: int,
        image_table: torch.Tensor | None,
        tables: ItemTables,
        table_is_trunk: bool = False,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.ctx = ctx
        self.hard_per_query = hard_per_query
        self.table_is_trunk = table_is_trunk  # rows are cached trunk features: the (trained) head runs each step
        self.register_buffer("image_table", image_table, persistent=False)
        self.tables = tables

    def image_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.image_table is not None:
            ids = [batch["reference_ids"], batch["target_ids"], batch["hard_ids"].clamp(min=0)]
            if not self.table_is_trunk:
                reference, target, hard = (self.image_table[i] for i in ids)
                return reference, target, hard
            features = self.model.backbone.image_head(self.image_table[torch.cat(ids)])
            reference, target, hard = features.split([len(i) for i in ids])
            return reference, target, hard
        b = len(batch["target_ids"])
        features = self.model.backbone.encode_images(batch["pixels"])
        valid = (batch["hard_ids"] >= 0).nonzero().squeeze(1)
        hard = features.new_zeros(len(batch["hard_ids"]), features.shape[1]).index_copy(0, valid, features[2 * b :])
        return features[:b], features[b : 2 * b], hard

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        reference, target, hard = self.image_features(batch)
        queries = self.model.query_vectors(query_parts(self.model, batch, reference, self.tables.descriptions))
        queries = gather_with_local_grad(queries, self.ctx)
        targets = gather_with_local_grad(self.tables.items(self.model, target, batch["target_ids"]), self.ctx)
        target_ids = gather_with_local_grad(batch["target_ids"], self.ctx)
        columns = target_ids
        hard_columns = None
        if self.hard_per_query:
            hard_columns = gather_with_local_grad(self.tables.items(self.model, hard, batch["hard_ids"]), self.ctx)
            columns = torch.cat([target_ids, gather_with_local_grad(batch["hard_ids"], self.ctx)])
        ignore = InBatchContrastiveLoss.duplicate_mask(target_ids, columns)
        loss = self.loss(queries, targets, hard_columns, ignore)
        return loss * self.ctx.world_size, loss.detach()


def prepare_stage1(config: Stage1Config, start: StageStart) -> StageSetup:
    """Stage 1 (see :func:`fashion_cir.training.stages.train_stage`): the given triplets mixed per
    ``config.annotated_ratio`` (annotated and generated, told apart by the generator's ``source``
    field), in-batch negatives plus hard negatives; ``start.image_paths`` must hold every reference,
    target and hard-negative image. The image encoder trains from pixels, from the cached trunk
    features (only its head trains) or not at all, as ``config.encoders`` and the backbone allow."""
    model, image_paths, records, ctx, out_dir = start.model, start.image_paths, start.records, start.ctx, start.out_dir
    train_triplets = start.triplets
    usable = [t for t in train_triplets if t.candidate in image_paths and t.target in image_paths]
    encoders = ENCODER_CHOICES[config.encoders]
    set_trainable(model, encoders, config.last_n_blocks, config.train_combiner, config.train_matcher)
    model.to(ctx.device)
    image_index = {image_id: i for i, image_id in enumerate(image_paths)}
    table = None
    from_trunk = "image" in encoders and model.backbone.trains_from_cache(config.last_n_blocks)
    load_pixels = "image" in encoders and not from_trunk
    unreadable: list[str] = []
    if load_pixels:  # the loader decodes images at every step: leave out unreadable ones now, not mid-epoch
        needed = {i for t in usable for i in (t.candidate, t.target, *t.hard_negatives) if i in image_paths}
        image_paths, unreadable = readable_images({i: image_paths[i] for i in image_paths if i in needed})
        usable = [t for t in usable if t.candidate in image_paths and t.target in image_paths]
        image_index = {image_id: i for i, image_id in enumerate(image_paths)}
    if not load_pixels:  # frozen image encoder (or only its head trains): encode every image the triplets use once
        needed = {i for t in usable for i in (t.candidate, t.target, *t.hard_negatives) if i in image_paths}
        cache = FeatureCache(config.cache_dir or out_dir / "cache")
        ids, features = shared_image_features(
            model.backbone,
            {i: image_paths[i] for i in image_paths if i in needed},
            cache,
            ctx,
            config.eval_batch_size,
            config.num_workers,
            config.progress,
            head=not from_trunk,
        )
        image_index = {image_id: i for i, image_id in enumerate(ids)}
        table = features
        usable = [t for t in usable if t.candidate in image_index and t.target in image_index]
    plan = training_triplets("stage1", usable, len(train_triplets), config)
    valid_paths = {i: image_paths[i] for i in image_index}
    dataset = TripletExamples(
        model, plan.triplets, valid_paths, records, config.seed, config.hard_negatives_per_query, load_pixels
    )
    collate = Collate(model, image_index, config.hard_negatives_per_query)
    tables = ItemTables(*item_parts(model, list(image_index), records, config.cache_dir or out_dir / "cache"))
    step_module = Stage1Step(
        model,
        InBatchContrastiveLoss(config.scale),
        ctx,
        config.hard_negatives_per_query,
        table,
        tables,
        table_is_trunk=from_trunk,
    )
    image_features = (
        "pixels" if load_pixels else "feature cache (trunk; head trained)" if from_trunk else "feature cache"
    )
    summary = {"unreadable_images": len(unreadable), "encoders": encoders, "image_features": image_features}
    return StageSetup("stage1", step_module, plan, (dataset, collate), load_pixels, summary)
