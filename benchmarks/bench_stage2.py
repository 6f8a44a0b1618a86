"""Cost of one stage-2 epoch: static bank (SPN4CIR) versus re-encoding images every batch (CLIP4Cir).

Both train the text encoder with the same data pipeline, optimizer and batch; they differ in where
image features come from and how many negatives each query sees:

- static:   the catalog is encoded ONCE (timed separately); each step composes queries with bank rows
            and scores them against the whole bank -> catalog-1 negatives per query.
- re-encode: each step decodes and encodes the batch's reference and target images with the frozen
            image encoder (CLIP4Cir's combiner/text training) -> batch-1 in-batch negatives.
- re-encode for the same negatives: encoding the whole catalog every step (what matching the static
            bank's negatives would cost without it), estimated as steps x catalog encoding time.

    .venv/bin/python benchmarks/bench_stage2.py --backbone tiny --catalog 1024 --triplets 256 --batch-size 32
    .venv/bin/python benchmarks/bench_stage2.py --backbone openclip:ViT-B-32:random --catalog 256 --triplets 64 --batch-size 16

Data: the clothing dataset's TRAIN split and annotated train captions (never the test split).
``openclip:MODEL:random`` is an open_clip architecture with random weights (no download needed)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fashion_cir.data.triplets import load_triplet_set
from fashion_cir.features.cache import FeatureCache
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone
from fashion_cir.training.data import Collate, TripletExamples, epoch_batches
from fashion_cir.training.distributed import DistContext, shared_image_features
from fashion_cir.training.losses import BankInfoNCELoss, InBatchContrastiveLoss
from fashion_cir.training.stage2 import Stage2Step, StaticBank

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-dataset"  # ../shared from the repository


def build_model(spec: str) -> CIRModel:
    model = CIRModel(create_backbone(spec), "sum_raw")
    model.backbone.set_trainable(["text"])
    return model


def run_epoch(model: CIRModel, step, dataset, collate, batches) -> float:
    """Seconds for one epoch of optimizer steps (data loading included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    start = time.perf_counter()
    for batch_indices in batches:
        batch = collate([dataset[(0, pos, i)] for pos, i in enumerate(batch_indices)])
        optimizer.zero_grad(set_to_none=True)
        loss = step(batch)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--catalog", type=int, default=1024, help="catalog (bank) images from the train split")
    parser.add_argument("--triplets", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.manual_seed(0)

    train = load_triplet_set(
        args.data / "captions/cap.clothing.train.json",
        args.data / "image_splits/split.clothing.train.json",
        args.data / "images",
    )
    triplets = train.triplets[: args.triplets]
    used = dict.fromkeys(i for t in triplets for i in (t.candidate, t.target))
    catalog_ids = list(dict.fromkeys([*used, *train.gallery_ids]))[: max(args.catalog, len(used))]
    catalog = {i: train.image_paths[i] for i in catalog_ids}
    model = build_model(args.backbone)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        ids, features = shared_image_features(model.backbone, catalog, FeatureCache(cache_dir), ctx, progress=False)
        bank_seconds = time.perf_counter() - start
    bank = StaticBank(model, ids, features)
    batches = epoch_batches(len(triplets), 0, args.batch_size, None, seed=0, epoch=0)

    static_data = TripletExamples(model, triplets, catalog, None, seed=0)
    static_step = Stage2Step(model, bank, BankInfoNCELoss(0.02))
    static_seconds = run_epoch(model, lambda b: static_step(b)[0], static_data, Collate(model, bank.index, 0), batches)

    pixel_data = TripletExamples(model, triplets, catalog, None, seed=0, load_pixels=True)
    in_batch = InBatchContrastiveLoss(100.0)

    def reencode_step(batch: dict) -> torch.Tensor:
        with torch.no_grad():  # frozen image encoder, re-run on every batch
            images = model.backbone.encode_images(batch["pixels"])
        n = len(batch["target_ids"])
        queries = model.compose(images[:n], model.backbone.encode_texts(batch["tokens"]))
        return in_batch(
            queries,
            F.normalize(images[n : 2 * n], dim=-1),
            ignore=InBatchContrastiveLoss.duplicate_mask(batch["target_ids"], batch["target_ids"]),
        )

    reencode_seconds = run_epoch(model, reencode_step, pixel_data, Collate(model, bank.index, 0), batches)
    steps = len(batches)
    full_reencode = steps * bank_seconds + static_seconds  # static epoch ~ the text-encoder work

    print(
        f"backbone {args.backbone} | catalog {len(ids)} images | {len(triplets)} triplets | batch {args.batch_size} | "
        f"{steps} steps/epoch | {torch.get_num_threads()} CPU threads"
    )
    print(f"{'method':<38}{'epoch s':>10}{'negatives/query':>17}")
    print(f"{'static bank (SPN4CIR)':<38}{static_seconds:>10.2f}{len(ids) - 1:>17}")
    print(f"{'  + one-off bank encoding':<38}{bank_seconds:>10.2f}")
    print(f"{'re-encode batch images (CLIP4Cir)':<38}{reencode_seconds:>10.2f}{args.batch_size - 1:>17}")
    print(f"{'re-encode catalog each batch (est.)':<38}{full_reencode:>10.2f}{len(ids) - 1:>17}")
    print(
        f"ratio re-encode / static epoch: {reencode_seconds / static_seconds:.2f}x time for "
        f"{(args.batch_size - 1) / (len(ids) - 1):.3f}x the negatives; "
        f"static incl. bank encoding: {(static_seconds + bank_seconds):.2f} s; "
        f"same negatives by re-encoding: {full_reencode / static_seconds:.1f}x the static epoch"
    )


if __name__ == "__main__":
    main()
