"""The training loop both stages share: AdamW + warm-up/cosine, AMP, gradient accumulation and
clipping, DDP, JSONL metrics, per-epoch validation with best-model keeping, and atomic checkpoints
(``<out>/checkpoint.pt``) that resume exactly: trained parameters, optimizer, scheduler, grad scaler,
every rank's RNG states, and the data position (epoch, step)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.triplets import Triplet
from ..errors import FashionCIRError
from ..evaluation.evaluator import Evaluator, Selection
from ..features.cache import FeatureCache
from ..io import append_jsonl, atomic_write_bytes, atomic_write_text, write_json
from ..models.cir import CIRModel
from ..progress import Progress
from .config import RESUMABLE_FIELDS, TrainConfig
from .data import Collate, TrainingTriplets, TripletExamples, epoch_loader
from .distributed import DistContext, mean_over_ranks, setup_distributed

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "fashion-cir-checkpoint/1"


class TrainingStopped(FashionCIRError):
    """Raised after ``stop_after_steps`` (a testing aid that simulates a kill)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_stage(config: TrainConfig, out_dir: str | Path) -> tuple[DistContext, Path]:
    """Join torchrun's process group (if any), seed this rank, create ``out_dir``, check the batch split."""
    ctx = setup_distributed(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + ctx.rank)
    micro = config.batch_size // config.grad_accum_steps
    if micro % ctx.world_size:
        raise FashionCIRError(
            f"micro-batch {micro} (batch_size / grad_accum_steps) is not divisible by {ctx.world_size} ranks"
        )
    return ctx, out_dir


def rng_state() -> dict:
    """Every RNG's state in types ``torch.load(weights_only=True)`` reads (no pickled numpy arrays)."""
    # the legacy state is this tuple (numpy's stubs type it as tuple or dict)
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, position, has_gauss, cached = legacy
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio`` of the steps, then cosine to ``min_lr_ratio``."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None on CPU or when off; ``auto`` = bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def _step_of(line: str) -> int:
    """The global step a metrics.jsonl line records (0 for events without one; torn lines: past all)."""
    try:
        return int(json.loads(line).get("step") or 0)
    except (ValueError, AttributeError):
        return 1 << 62


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0
    best_metric: float | None = None
    history: list = field(default_factory=list)


def config_differences(saved: dict, current: dict) -> list[str]:
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k)
    ]


@dataclass
class StageRun:
    """What a stage hands to :func:`fit`. ``step_module(batch)`` returns (loss to back-propagate,
    loss to report); ``micro_batches(epoch, start_step)`` yields this rank's micro-batches on device."""

    name: str
    config: TrainConfig
    model: CIRModel
    step_module: nn.Module
    micro_batches: Callable[[int, int], Iterator[dict]]
    steps_per_epoch: int
    evaluator: Evaluator | None  # validation each epoch and the selection rule (None: the last epoch is kept)
    out_dir: Path
    ctx: DistContext
    image_encoder_trains: bool
    summary: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, run: StageRun):
        self.run = run
        cfg = run.config
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        if not self.params:
            raise FashionCIRError(f"{run.name}: nothing to train (every parameter is frozen)")
        self.total_steps = cfg.epochs * run.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        )
        self.dtype = amp_dtype(cfg.amp, run.ctx.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        if run.ctx.world_size > 1:
            ids = [run.ctx.device.index] if run.ctx.device.type == "cuda" else None
            self.module: nn.Module = DistributedDataParallel(run.step_module, device_ids=ids, broadcast_buffers=False)
        else:
            self.module = run.step_module
        self.progress = Position()
        self.checkpoint_path = run.out_dir / CHECKPOINT_FILE
        self.metrics_path = run.out_dir / "metrics.jsonl"

    # -- checkpoints ---------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """Trained parameters plus every buffer (BatchNorm running statistics change in training)."""
        params = {n: p.detach().cpu() for n, p in self.run.model.named_parameters() if p.requires_grad}
        return {**params, **{n: b.detach().cpu().clone() for n, b in self.run.model.named_buffers()}}

    def save_checkpoint(self) -> None:
        ctx = self.run.ctx
        states: list[Any] = [None] * ctx.world_size
        if ctx.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if ctx.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "stage": self.run.name,
                "config": self.run.config.model_dump(mode="json"),
                "progress": self.progress.__dict__,
                "params": self.trained_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": states,
            }
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            atomic_write_bytes(self.checkpoint_path, buffer.getvalue())
        ctx.barrier()

    def load_checkpoint(self) -> bool:
        if not (self.run.config.resume and self.checkpoint_path.is_file()):
            return False
        try:
            # weights_only: a checkpoint is data (tensors, numbers, strings); a crafted one cannot run code
            payload = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FashionCIRError(
                f"corrupt or unsafe checkpoint {self.checkpoint_path}: {reason}; delete it to start over"
            ) from exc
        if not isinstance(payload, dict):
            raise FashionCIRError(f"{self.checkpoint_path} is not a fashion-cir checkpoint; delete it to start over")
        if payload.get("format") != CHECKPOINT_FORMAT or payload.get("stage") != self.run.name:
            raise FashionCIRError(
                f"{self.checkpoint_path} is not a {self.run.name} checkpoint; use another output folder"
            )
        changed = config_differences(payload["config"], self.run.config.model_dump(mode="json"))
        if changed:
            raise FashionCIRError(
                f"{self.checkpoint_path} was written with another config ({'; '.join(changed)}); "
                "use another output folder, restore the config, or set resume=false"
            )
        names = {**dict(self.run.model.named_parameters()), **dict(self.run.model.named_buffers())}
        with torch.no_grad():
            for name, value in payload["params"].items():
                names[name].copy_(value)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        states = payload["rng"]
        set_rng_state(states[self.run.ctx.rank % len(states)])
        self.progress = Position(**payload["progress"])
        return True

    # -- logging and validation -----------------------------------------------------------------
    def drop_metrics_after(self, step: int) -> None:
        """Forget metric records of steps after ``step``: a killed run logged them, and the resumed
        run (which restarts from the checkpoint at ``step``) logs them again."""
        if not (self.run.ctx.is_main and self.metrics_path.is_file()):
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.metrics_path, "".join(kept))

    def log(self, record: dict) -> None:
        if self.run.ctx.is_main:
            append_jsonl(self.metrics_path, [{"stage": self.run.name, "time": round(time.time(), 3), **record}])

    def validate(self) -> tuple[dict | None, float | None]:
        """Rank 0 scores the model in its query mode with the stage's evaluator; returns (the report,
        the selection figure). While the image encoder trains its features go to a throw-away cache."""
        run = self.run
        if run.evaluator is None or not run.ctx.is_main:
            return None, None
        evaluator = run.evaluator
        if run.image_encoder_trains:  # features of a moving encoder are never reused
            evaluator = Evaluator(
                evaluator.sets,
                FeatureCache(run.out_dir / ".val_cache"),
                evaluator.records,
                evaluator.options,
                evaluator.selection,
                None,
                evaluator.protocols,
            )
        report = evaluator(run.model)
        if run.image_encoder_trains:
            shutil.rmtree(run.out_dir / ".val_cache", ignore_errors=True)
        mode = run.model.query_mode
        return {protocol: by_mode[mode] for protocol, by_mode in report.items()}, evaluator.figure(report, mode)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> CIRModel:
        run, cfg, ctx = self.run, self.run.config, self.run.ctx
        resumed = self.load_checkpoint()
        self.drop_metrics_after(self.progress.global_step)
        if ctx.is_main:
            cfg.to_json(run.out_dir / "config.json")
        self.log(
            {
                "event": "resume" if resumed else "start",
                **self.progress.__dict__,
                **run.summary,
                "world_size": ctx.world_size,
                "steps_per_epoch": run.steps_per_epoch,
                "trainable_parameters": sum(p.numel() for p in self.params),
                "amp": str(self.dtype) if self.dtype else "off",
            }
        )
        if not resumed:  # the starting point of the validation curve (the start model's scores: cached)
            report, metric = self.validate()
            if report is not None and metric is not None:
                self.log({"epoch": -1, "step": 0, "val": report, "selection_metric": metric, "before_training": True})
                self.report_validation("before training", report, metric, False)
        bar = Progress(
            self.total_steps, run.name, "step", enabled=cfg.progress and ctx.is_main, initial=self.progress.global_step
        )
        autocast = (lambda: torch.autocast("cuda", dtype=self.dtype)) if self.dtype else contextlib.nullcontext
        try:
            while self.progress.epoch < cfg.epochs:
                run.model.train()
                batches = run.micro_batches(self.progress.epoch, self.progress.step)
                while self.progress.step < run.steps_per_epoch:
                    loss, grad_norm = self.train_step(batches, autocast)
                    self.progress.step += 1
                    self.progress.global_step += 1
                    bar.update(1, f"loss {loss:.4f}, epoch {self.progress.epoch + 1}")
                    if self.progress.global_step % cfg.log_every == 0 or self.progress.global_step == 1:
                        self.log(
                            {
                                "epoch": self.progress.epoch,
                                "step": self.progress.global_step,
                                "loss": loss,
                                "grad_norm": grad_norm,
                                "lr": self.scheduler.get_last_lr()[0],
                            }
                        )
                    if self.progress.global_step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if cfg.stop_after_steps == self.progress.global_step:
                        raise TrainingStopped(
                            f"{run.name}: stopped after step {self.progress.global_step} (stop_after_steps)"
                        )
                self.end_epoch()
        finally:
            bar.close()
        if ctx.is_main:
            run.model.save(
                run.out_dir / "model",
                {
                    "stage": run.name,
                    "config": cfg.model_dump(mode="json"),
                    "global_step": self.progress.global_step,
                    "best_metric": self.progress.best_metric,
                },
            )
            write_json(run.out_dir / "summary.json", {"stage": run.name, **self.progress.__dict__, **run.summary})
        ctx.barrier()
        return run.model.eval()

    def train_step(self, batches: Iterator[dict], autocast) -> tuple[float, float]:
        cfg, ctx = self.run.config, self.run.ctx
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=ctx.device)
        for micro in range(cfg.grad_accum_steps):
            batch = next(batches)
            last = micro == cfg.grad_accum_steps - 1
            # with several ranks the module is the DistributedDataParallel wrapper
            ddp = cast(DistributedDataParallel, self.module)
            sync = contextlib.nullcontext() if last or ctx.world_size == 1 else ddp.no_sync()
            with sync:
                with autocast():
                    loss, report = self.module(batch)
                self.scaler.scale(loss / cfg.grad_accum_steps).backward()
            total += report.detach().float() / cfg.grad_accum_steps
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(mean_over_ranks(total, ctx)), float(grad_norm)

    def report_validation(self, when: str, report: dict, metric: float, improved: bool) -> None:
        """One console line per validation, as the training runs (R@10 averaged over the val sets)."""
        recalls = ", ".join(f"{protocol} {table['average']['R@10']:.1f}" for protocol, table in report.items())
        print(
            f"{self.run.out_dir.name} {when}: val R@10 {recalls}; selection figure {metric:.2f}"
            f"{' (best so far)' if improved else ''}",
            flush=True,
        )

    def end_epoch(self) -> None:
        run, cfg = self.run, self.run.config
        report, metric = self.validate()
        improved = metric is not None and Selection.improves(metric, self.progress.best_metric)
        if run.ctx.is_main and (improved or run.evaluator is None):
            run.model.save(
                run.out_dir / "best",
                {
                    "stage": run.name,
                    "epoch": self.progress.epoch,
                    "global_step": self.progress.global_step,
                    "selection": {
                        **(run.evaluator.selection.model_dump(mode="json") if run.evaluator else {}),
                        "value": metric,
                    },
                },
            )
        if improved:
            self.progress.best_metric = metric
        if report is not None and metric is not None:
            self.log(
                {
                    "epoch": self.progress.epoch,
                    "step": self.progress.global_step,
                    "val": report,
                    "selection_metric": metric,
                    "best": improved,
                }
            )
            self.report_validation(f"epoch {self.progress.epoch + 1}/{cfg.epochs}", report, metric, improved)
            self.progress.history.append({"epoch": self.progress.epoch, "metric": metric})
        elif run.ctx.is_main:
            print(
                f"{run.out_dir.name} epoch {self.progress.epoch + 1}/{cfg.epochs}: done at step "
                f"{self.progress.global_step} (no validation: the last epoch is kept)",
                flush=True,
            )
        self.progress.epoch += 1
        self.progress.step = 0
        self.save_checkpoint()


@dataclass
class StageStart:
    """What a stage starts from: the model, the given triplets, their images and catalog records
    (descriptions, attributes), the processes it runs on and its output folder."""

    model: CIRModel
    triplets: list[Triplet]
    image_paths: dict[str, Path]
    records: Mapping[str, Mapping[str, Any]] | None
    ctx: DistContext
    out_dir: Path


@dataclass
class StageSetup:
    """What a stage trains: ``step_module`` on ``plan``'s triplets as ``examples`` (dataset,
    collate) read them; ``summary`` holds the stage's own figures."""

    name: str
    step_module: nn.Module
    plan: TrainingTriplets
    examples: tuple[TripletExamples, Collate]
    image_encoder_trains: bool
    summary: dict


def fit_stage(config: TrainConfig, start: StageStart, setup: StageSetup, evaluator: Evaluator | None) -> CIRModel:
    """Train a stage set up from ``start`` with a :class:`Trainer`; the run's summary starts with
    the triplet counts and ends with the model's query mode and text template, the stage's own
    figures in between."""
    plan, model = setup.plan, start.model
    run = StageRun(
        setup.name,
        config,
        model,
        setup.step_module,
        epoch_loader(*setup.examples, plan.n_annotated, plan.n_generated, config, start.ctx),
        plan.steps,
        evaluator,
        start.out_dir,
        start.ctx,
        setup.image_encoder_trains,
        {
            "annotated_triplets": plan.n_annotated,
            "generated_triplets": plan.n_generated,
            "skipped_triplets": plan.skipped,
            **setup.summary,
            "query_mode": model.query_mode,
            "text_template": model.text_template,
        },
    )
    return Trainer(run).fit()
