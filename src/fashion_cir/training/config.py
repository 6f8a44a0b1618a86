"""Typed training configurations (pydantic). Each run writes its config to ``<out>/config.json``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import Config

# Fields that may change between a run and its resumption (they do not change the result).
RESUMABLE_FIELDS = frozenset(
    {
        "stop_after_steps",
        "progress",
        "num_workers",
        "log_every",
        "resume",
        "device",
        "eval_batch_size",
        "cache_dir",
        "checkpoint_every",
    }
)


class TrainConfig(Config):
    """What both stages share: optimisation, data mixing, checkpoints, validation, logging."""

    seed: int = 0
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch per optimizer step (all ranks, all micro-batches)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per step; in-batch negatives are per micro-batch")
    lr: float = 2e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    warmup_ratio: float = Field(
        0.0, ge=0, le=1, description="linear warm-up over this fraction of all steps, then cosine"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    max_grad_norm: float | None = 1.0
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="CUDA only: auto = bf16 where supported, else fp16"
    )
    annotated_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of each batch drawn from annotated triplets (the smaller pool is oversampled); "
        "None = one shuffled pool",
    )
    train_combiner: bool = Field(True, description="train the Combiner head when the model has one")
    train_matcher: bool = Field(
        True, description="train the description matcher's query encoder when the model has one"
    )
    last_n_blocks: int | None = Field(
        None, ge=1, description="unfreeze only the last N transformer blocks of each trained encoder"
    )
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (also written at each epoch end)")
    eval_batch_size: int = 64
    num_workers: int = 0
    log_every: int = 10
    progress: bool = True
    cache_dir: str | None = Field(None, description="FeatureCache root (default <out>/cache)")
    resume: bool = Field(True, description="continue from <out>/checkpoint.pt when it exists")
    device: str | None = Field(None, description="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    stop_after_steps: int | None = Field(
        None, ge=1, description="testing aid: stop (as if killed) right after this global step"
    )

    @model_validator(mode="after")
    def _check_batch(self):
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}"
            )
        return self


class Stage1Config(TrainConfig):
    """Stage 1 (CLIP4Cir): fine-tune CLIP's encoders with in-batch (+ hard) negatives.
    When the image encoder is frozen (``encoders='text'``) image features come from the FeatureCache."""

    encoders: Literal["text", "image", "both"] = "both"
    scale: float = Field(100.0, gt=0, description="logit scale (1 / temperature)")
    hard_negatives_per_query: int = Field(
        1, ge=0, description="hard negatives taken from each triplet as extra columns"
    )


class Stage2Config(TrainConfig):
    """Stage 2 (SPN4CIR static representations): frozen image encoder, the training catalog encoded
    once into a bank; text encoder and/or Combiner trained with InfoNCE against the whole bank."""

    encoders: Literal["text", "none"] = "text"
    temperature: float = Field(0.02, gt=0)
    hard_negatives_per_query: int = Field(0, ge=0, description="each triplet's hard negatives weighted in (bank rows)")
    hard_negative_weight: float = Field(1.0, gt=0, description="how many times a hard negative counts in the softmax")
    lr: float = 2e-5
    batch_size: int = Field(256, ge=1)
    epochs: int = Field(3, ge=1)
