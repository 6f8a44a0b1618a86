"""torchrun/DDP plumbing: process group setup, feature gathering, a bank shared by every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..features.cache import FeatureCache
from ..models.backbone import Backbone


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.
    A single process needs no group. The device defaults to cuda:LOCAL_RANK, else cpu."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank, world_size, local_rank, target)


def gather_with_local_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank (rank order). Only this rank's slice carries gradient;
    a loss over the gathered batch multiplied by world_size then yields, after DDP's gradient
    averaging, exactly the single-process gradient of the same global batch."""
    if ctx.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[ctx.rank] = tensor
    return torch.cat(parts)


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ctx.world_size


def shared_image_features(
    backbone: Backbone,
    image_paths: dict[str, Path],
    cache: FeatureCache,
    ctx: DistContext,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    head: bool = True,
) -> tuple[list[str], torch.Tensor]:
    """Unnormalised image features [N, d] (with ``head=False`` the cached trunk features) on
    ``ctx.device``, identical on every rank: rank 0 encodes (or reuses) them through the FeatureCache
    and broadcasts ids and features. Unreadable images are skipped (absent from the returned ids)."""
    if ctx.is_main:
        ids, features = cache.encode(
            backbone,
            image_paths,
            batch_size,
            num_workers,
            on_error="skip",
            progress=progress,
            device=ctx.device,
            head=head,
        )
        table = torch.from_numpy(features).to(ctx.device)
    else:
        ids, table = [], None
    if ctx.world_size > 1:
        box = [(ids, None if table is None else table.shape[1])]
        dist.broadcast_object_list(box, src=0)
        ids, width = box[0]
        if table is None:
            table = torch.empty(len(ids), width or 0, device=ctx.device)
        dist.broadcast(table, src=0)
    if table is None:  # only rank 0 encodes; with one process it is rank 0
        raise RuntimeError("image features were neither encoded nor received")
    return ids, table
