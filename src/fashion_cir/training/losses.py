"""Contrastive losses for composed retrieval. Inputs are L2-normalised vectors; row ``i`` of the
queries has exactly one positive, and every column that is a duplicate of that positive (same
image, or an identical feature row) is removed from the row so it is never counted as a negative."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _masked_cross_entropy(logits: torch.Tensor, positives: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, C] with target columns ``positives`` [B]; columns where
    ``ignore`` [B, C] is True drop out of the softmax (the positive column is always kept)."""
    logits = logits.float()
    if ignore is not None:
        ignore = ignore.clone()
        ignore[torch.arange(len(positives), device=ignore.device), positives] = False
        logits = logits.masked_fill(ignore, float("-inf"))
    return F.cross_entropy(logits, positives)


class InBatchContrastiveLoss(nn.Module):
    """CLIP4Cir stage-1 loss: cross-entropy over ``scale * q @ [t; h].T``.

    Query ``i``'s positive is target ``i``; the other in-batch targets and the optional hard-negative
    rows ``h`` (extra target-side columns, shared by every query) are its negatives. ``ignore``
    [B, B+H] marks columns that are duplicates of a row's positive (e.g. two triplets with the same
    target image, or a hard negative that is the row's own target); they are masked out.

    Example: ``InBatchContrastiveLoss(scale=100)(q, t)`` with ``q, t`` of shape [B, d]."""

    def __init__(self, scale: float = 100.0):
        super().__init__()
        self.scale = scale

    def forward(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        columns = (
            targets if hard_negatives is None or len(hard_negatives) == 0 else torch.cat([targets, hard_negatives])
        )
        logits = self.scale * queries @ columns.T
        positives = torch.arange(len(queries), device=queries.device)
        return _masked_cross_entropy(logits, positives, ignore)

    @staticmethod
    def duplicate_mask(target_ids: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
        """[B, C] True where column ``j`` shows row ``i``'s target image (integer image ids; use a
        negative id for padding columns, which are then masked for every row)."""
        return (column_ids[None, :] == target_ids[:, None]) | (column_ids[None, :] < 0)


class BankInfoNCELoss(nn.Module):
    """SPN4CIR stage-2 loss: InfoNCE of each query against an ENTIRE static bank of target features.

    ``logits = q @ bank.T / temperature``; row ``i``'s positive is bank row ``positives[i]``. With
    ``groups`` [N] (equal values = identical images, e.g. from :func:`duplicate_groups`), every other
    bank row in the positive's group is masked, so a duplicate of the positive is never a negative.

    With ``hard_ids`` [B, k] (bank rows, ``-1`` = none) and ``hard_weight`` w, each row's hard
    negatives count w times in its softmax denominator (their logits shift by log w).

    Example: ``BankInfoNCELoss(0.02)(q, bank, positives, groups)`` with q [B, d], bank [N, d]."""

    def __init__(self, temperature: float = 0.02, hard_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if hard_weight <= 0:
            raise ValueError(f"hard_weight must be positive, got {hard_weight}")
        self.temperature = temperature
        self.hard_weight = hard_weight

    def forward(
        self,
        queries: torch.Tensor,
        bank: torch.Tensor,
        positives: torch.Tensor,
        groups: torch.Tensor | None = None,
        hard_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = queries @ bank.T / self.temperature
        if hard_ids is not None and hard_ids.numel() and self.hard_weight != 1.0:
            n = logits.shape[1]  # padding (-1) goes to an extra column that is dropped
            columns = torch.where(hard_ids < 0, torch.full_like(hard_ids, n), hard_ids)
            shift = logits.new_zeros(len(logits), n + 1).scatter_(1, columns, math.log(self.hard_weight))
            logits = logits + shift[:, :n]
        ignore = groups[None, :] == groups[positives][:, None] if groups is not None else None
        return _masked_cross_entropy(logits, positives, ignore)


def duplicate_groups(features: torch.Tensor) -> torch.Tensor:
    """Group index per row [N]: rows with bit-identical features share a group."""
    return torch.unique(features, dim=0, return_inverse=True)[1]


class SymmetricInfoNCELoss(nn.Module):
    """CLIP's loss for aligning two towers: the mean of image->text and text->image cross-entropy
    over the batch (row ``i`` of each side is the other's positive), with a learnable
    log-temperature ``logit_scale`` (its exponent capped at 100, as CLIP caps it)."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        logits = logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        labels = torch.arange(len(image), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
