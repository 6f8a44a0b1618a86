"""Two-stage fine-tuning: stage 1 (CLIP4Cir, in-batch + hard negatives) and stage 2 (SPN4CIR,
static-representation bank negatives), their losses and configs; recipes run them (torchrun-ready:
``torchrun --nproc_per_node N -m fashion_cir.cli run RECIPE``)."""

from .config import Stage1Config, Stage2Config, TrainConfig
from .loop import TrainingStopped
from .losses import BankInfoNCELoss, InBatchContrastiveLoss, duplicate_groups
from .stages import train_stage

__all__ = [
    "Stage1Config",
    "Stage2Config",
    "TrainConfig",
    "BankInfoNCELoss",
    "InBatchContrastiveLoss",
    "duplicate_groups",
    "TrainingStopped",
    "train_stage",
]
