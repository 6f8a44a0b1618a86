"""The training loop's checkpoints (training/loop.py): loaded with weights_only, so a crafted one runs
nothing, and a resumed run logs each step once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fashion_cir.errors import FashionCIRError
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.factory import create_backbone


class _Payload:
    """Unpickling this creates a file: proof that loading ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    from support.training import load_data, make_dataset

    return load_data(
        make_dataset(tmp_path_factory.mktemp("train-catalog"), n_train=8, n_val=4, n_annotated=8, n_generated=8)
    )


def test_checkpoints_load_with_weights_only_and_a_crafted_one_runs_nothing(training_data, tmp_path):
    """Issue 12 item 3: resume used torch.load(weights_only=False), so a crafted checkpoint.pt ran code."""
    from fashion_cir.training import Stage2Config, train_stage

    triplets, paths, _, records = training_data
    config = Stage2Config(epochs=1, batch_size=8, lr=1e-3, progress=False)
    train_stage(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path / "ok")
    saved = torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)  # every state is plain data
    assert saved["format"] == "fashion-cir-checkpoint/1" and saved["progress"]["epoch"] == 1

    marker = tmp_path / "code-ran"
    (tmp_path / "evil").mkdir()
    torch.save(
        {"format": "fashion-cir-checkpoint/1", "stage": "stage2", "x": _Payload(marker)},
        tmp_path / "evil" / "checkpoint.pt",
    )
    with pytest.raises(FashionCIRError, match="corrupt or unsafe checkpoint"):
        train_stage(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path / "evil")
    assert not marker.exists()


def test_a_resumed_training_logs_each_step_once(training_data, tmp_path):
    """Kill loop finding: steps logged after the last checkpoint were logged again on resume."""
    from fashion_cir.training import Stage2Config, TrainingStopped, train_stage

    triplets, paths, _, records = training_data
    config = Stage2Config(epochs=2, batch_size=4, lr=1e-3, progress=False, log_every=1, checkpoint_every=2)
    with pytest.raises(TrainingStopped):  # logs step 3, last checkpoint at step 2: like a kill after step 3
        train_stage(
            config.model_copy(update={"stop_after_steps": 3}),
            CIRModel(create_backbone("tiny"), "sum"),
            triplets,
            paths,
            None,
            records,
            tmp_path,
        )
    train_stage(config, CIRModel(create_backbone("tiny"), "sum"), triplets, paths, None, records, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert steps == list(range(1, summary["global_step"] + 1))
