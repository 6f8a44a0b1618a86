"""Training data: annotated/generated pools, deterministic epoch batches, per-sample examples.

Everything random about the data (batch order, caption joining, hard-negative choice) is a pure
function of (seed, epoch, position), so a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.captions import join_captions_train, sentence_query
from ..data.images import open_image
from ..data.triplets import Triplet
from ..errors import FashionCIRError
from ..language.changes import read_changes
from ..models.cir import CIRModel
from .distributed import DistContext


def is_generated(triplet: Triplet) -> bool:
    """Generated triplets carry a ``source`` field (the generator writes one); annotated ones do not
    (or say ``"annotated"``)."""
    return triplet.extra.get("source") not in (None, "annotated")


def order_pools(triplets: list[Triplet]) -> tuple[list[Triplet], int]:
    """Annotated triplets first, then generated ones; returns the list and the annotated count."""
    annotated = [t for t in triplets if not is_generated(t)]
    return annotated + [t for t in triplets if is_generated(t)], len(annotated)


@dataclass
class TrainingTriplets:
    """A stage's usable triplets, annotated first, and how many global batches an epoch has."""

    triplets: list[Triplet]
    n_annotated: int
    skipped: int  # of the given triplets, those left out (an image missing or unreadable)
    steps: int

    @property
    def n_generated(self) -> int:
        return len(self.triplets) - self.n_annotated


def training_triplets(stage: str, usable: list[Triplet], given: int, config: Any) -> TrainingTriplets:
    """``usable`` (of ``given`` triplets) ordered into pools and counted in batches of ``config``
    (``batch_size``, ``annotated_ratio``, ``seed``); FashionCIRError when they fill no batch."""
    triplets, n_annotated = order_pools(usable)
    batches = epoch_batches(
        n_annotated, len(triplets) - n_annotated, config.batch_size, config.annotated_ratio, config.seed, 0
    )
    if not batches:
        raise FashionCIRError(
            f"{stage}: {len(triplets)} usable training triplets, fewer than one batch of {config.batch_size}"
        )
    return TrainingTriplets(triplets, n_annotated, given - len(triplets), len(batches))


def epoch_batches(
    n_annotated: int, n_generated: int, batch_size: int, annotated_ratio: float | None, seed: int, epoch: int
) -> list[list[int]]:
    """Global batches of one epoch as indices into [annotated..., generated...].

    Without ``annotated_ratio`` (or with one pool empty): one shuffled pool, incomplete last batch
    dropped. With it: every batch holds round(ratio * batch_size) annotated triplets, the rest
    generated; the epoch lasts until both pools were seen once, the smaller one being oversampled
    (re-shuffled at every pass)."""
    rng = np.random.default_rng([seed, epoch])
    n_ann = round(annotated_ratio * batch_size) if annotated_ratio is not None else 0
    if annotated_ratio is None or n_annotated == 0 or n_generated == 0:
        order = rng.permutation(n_annotated + n_generated)
        return [order[i : i + batch_size].tolist() for i in range(0, len(order) - batch_size + 1, batch_size)]
    n_gen = batch_size - n_ann
    steps = max(math.ceil(n_annotated / n_ann) if n_ann else 0, math.ceil(n_generated / n_gen) if n_gen else 0)

    def stream(count: int, per_batch: int, offset: int) -> np.ndarray:
        need = steps * per_batch
        passes = [rng.permutation(count) for _ in range(math.ceil(need / count))] if need else [np.zeros(0, int)]
        return np.concatenate(passes)[:need] + offset

    ann, gen = stream(n_annotated, n_ann, 0), stream(n_generated, n_gen, n_annotated)
    return [
        rng.permutation(np.concatenate([ann[s * n_ann : (s + 1) * n_ann], gen[s * n_gen : (s + 1) * n_gen]])).tolist()
        for s in range(steps)
    ]


def rank_micro_batches(
    batches: list[list[int]], start_step: int, epoch: int, grad_accum_steps: int, ctx: DistContext
) -> list[list[tuple[int, int, int]]]:
    """This rank's micro-batches from ``start_step`` on, as (epoch, position, example) items; the
    position (index in the epoch's sample stream) seeds per-sample randomness."""
    out = []
    for step in range(start_step, len(batches)):
        batch = batches[step]
        micro = len(batch) // grad_accum_steps
        per_rank = micro // ctx.world_size
        for m in range(grad_accum_steps):
            first = m * micro + ctx.rank * per_rank
            out.append([(epoch, step * len(batch) + p, batch[p]) for p in range(first, first + per_rank)])
    return out


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{position}")


class TripletExamples(Dataset):
    """Items (epoch, position, index) -> one training example: the query's texts (CLIP4Cir training
    caption joining; the text tower's input per the model's text template, and the matcher's
    caption and prompt), the attribute terms of the caption's changes from the reference's record,
    reference, target, up to ``hard_negatives`` hard-negative image ids, and with ``load_pixels``
    the preprocessed images."""

    def __init__(
        self,
        model: CIRModel,
        triplets: list[Triplet],
        image_paths: dict[str, Path],
        records: Mapping[str, Mapping[str, Any]] | None,
        seed: int,
        hard_negatives: int = 0,
        load_pixels: bool = False,
    ):
        self.model = model
        self.triplets = triplets
        self.image_paths = image_paths
        self.records = records or {}
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.load_pixels = load_pixels

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        epoch, position, index = item
        triplet = self.triplets[index]
        rng = sample_rng(self.seed, epoch, position)
        caption = join_captions_train(list(triplet.captions), rng)
        record = self.records.get(triplet.candidate)
        prompt = triplet.reference_prompt or (record or {}).get("description")
        pool = [h for h in dict.fromkeys(triplet.hard_negatives) if h in self.image_paths and h != triplet.target]
        hard = rng.sample(pool, min(self.hard_negatives, len(pool)))
        example: dict[str, Any] = {
            "text": self.model.query_text(caption, prompt),
            "reference": triplet.candidate,
            "target": triplet.target,
            "hard": hard,
            "caption": caption,
            "prompt": sentence_query(prompt, caption),
        }
        if self.model.attribute_space is not None:
            example["attributes"] = self.model.attribute_space.query_rows(record, read_changes(caption))
        if self.load_pixels:
            preprocess = self.model.backbone.preprocess
            example["pixels"] = [
                preprocess(open_image(self.image_paths[i])) for i in [triplet.candidate, str(triplet.target), *hard]
            ]
        return example


class Collate:
    """Examples -> a batch: tokens (the text tower's; the matcher's for the caption and the prompt
    when the model's fusion weighs them), attribute term rows, integer image ids (``-1`` pads the
    hard-negative slots to a fixed ``hard_negatives`` per example, so every rank gathers equal
    shapes) and, with pixels, the images stacked as [references; targets; real hard negatives]."""

    def __init__(self, model: CIRModel, image_index: dict[str, int], hard_negatives: int):
        self.model = model
        self.image_index = image_index
        self.hard_negatives = hard_negatives

    def __call__(self, examples: list[dict]) -> dict:
        k = self.hard_negatives
        hard_ids = torch.full((len(examples) * k,), -1, dtype=torch.long)
        for i, ex in enumerate(examples):
            for j, h in enumerate(ex["hard"]):
                hard_ids[i * k + j] = self.image_index[h]
        batch = {
            "tokens": self.model.backbone.tokenize([ex["text"] for ex in examples]),
            "reference_ids": torch.tensor([self.image_index[ex["reference"]] for ex in examples]),
            "target_ids": torch.tensor([self.image_index[ex["target"]] for ex in examples]),
            "hard_ids": hard_ids,
        }
        matcher = self.model.matcher
        for term in ("caption",) if self.model.shares_text else ("caption", "prompt"):  # shared: the text tower's pass
            if matcher is not None and self.model.needs(term, self.model.fusion):
                batch[f"{term}_tokens"] = matcher.tokenize([ex[term] for ex in examples])
        if examples and "attributes" in examples[0]:
            batch["attributes"] = {
                t: torch.stack([ex["attributes"][t] for ex in examples]) for t in examples[0]["attributes"]
            }
        if examples and "pixels" in examples[0]:
            batch["pixels"] = torch.stack(
                [ex["pixels"][0] for ex in examples]
                + [ex["pixels"][1] for ex in examples]
                + [p for ex in examples for p in ex["pixels"][2:]]
            )
        return batch


def to_device(batch: dict, model: CIRModel, device: torch.device) -> dict:
    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value.to(device, non_blocking=True)

    moved = {k: move(v) for k, v in batch.items() if k != "tokens"}
    moved["tokens"] = model.backbone.tokens_to(batch["tokens"], device)
    return moved


def epoch_loader(
    dataset: TripletExamples, collate: Collate, n_annotated: int, n_generated: int, config, ctx: DistContext
) -> Callable[[int, int], Iterator[dict]]:
    """``(epoch, start_step) -> this rank's micro-batches on its device``, in a fixed order (workers
    decode images in parallel)."""

    def micro_batches(epoch: int, start_step: int) -> Iterator[dict]:
        batches = epoch_batches(n_annotated, n_generated, config.batch_size, config.annotated_ratio, config.seed, epoch)
        plan = rank_micro_batches(batches, start_step, epoch, config.grad_accum_steps, ctx)
        loader = DataLoader(
            dataset,
            batch_sampler=plan,
            collate_fn=collate,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
            pin_memory=ctx.device.type == "cuda",
        )
        return (to_device(batch, dataset.model, ctx.device) for batch in loader)

    return micro_batches
