"""Losses against hand-computed values; duplicates of the positive are never negatives; Combiner shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from fashion_cir.models.combiner import Combiner
from fashion_cir.training.losses import BankInfoNCELoss, InBatchContrastiveLoss, duplicate_groups


def _nll(logits_row: list[float], positive: int) -> float:
    return -math.log(math.exp(logits_row[positive]) / sum(math.exp(x) for x in logits_row))


def test_in_batch_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * q @ t.T = [[2, 1.2], [0, 1.6]]
    expected = (_nll([2.0, 1.2], 0) + _nll([0.0, 1.6], 1)) / 2
    assert math.isclose(InBatchContrastiveLoss(scale=2.0)(q, t).item(), expected, rel_tol=1e-6)


def test_in_batch_loss_with_hard_negative_columns():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    h = torch.tensor([[0.8, 0.6]])
    # extra column 2 * q @ h.T = [1.6, 1.2], seen by both queries
    expected = (_nll([2.0, 1.2, 1.6], 0) + _nll([0.0, 1.6, 1.2], 1)) / 2
    assert math.isclose(InBatchContrastiveLoss(scale=2.0)(q, t, h).item(), expected, rel_tol=1e-6)


def test_in_batch_duplicate_target_is_not_a_negative():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 4), dim=-1)
    t = F.normalize(torch.randn(3, 4), dim=-1)
    t[2] = t[0]  # triplets 0 and 2 share their target image (id 7)
    hard = F.normalize(torch.randn(2, 4), dim=-1)
    target_ids = torch.tensor([7, 8, 7])
    column_ids = torch.cat([target_ids, torch.tensor([8, -1])])  # hard 0 = row 1's own target; hard 1 = padding
    ignore = InBatchContrastiveLoss.duplicate_mask(target_ids, column_ids)
    loss = InBatchContrastiveLoss(scale=10.0)(q, t, hard, ignore)
    logits = 10.0 * q @ torch.cat([t, hard]).T
    keep = [[0, 1, 3], [0, 1, 2], [1, 2, 3]]  # each row: its positive plus the true negatives only
    expected = sum(_nll(logits[i, keep[i]].tolist(), keep[i].index(i)) for i in range(3)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_bank_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives = torch.tensor([2, 1])
    # logits = q @ bank.T / 0.5 = [[2, 0, 1.2], [0, 2, 1.6]]
    expected = (_nll([2.0, 0.0, 1.2], 2) + _nll([0.0, 2.0, 1.6], 1)) / 2
    assert math.isclose(BankInfoNCELoss(temperature=0.5)(q, bank, positives).item(), expected, rel_tol=1e-6)


def test_bank_loss_counts_each_hard_negative_weight_times():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives = torch.tensor([2, 1])
    hard_ids = torch.tensor([[0, -1], [-1, -1]])  # row 0: bank row 0 is a hard negative; row 1: padding only
    # logits as above; row 0's hard negative counts 4 times in its denominator
    row0 = -math.log(math.exp(1.2) / (4 * math.exp(2.0) + math.exp(0.0) + math.exp(1.2)))
    expected = (row0 + _nll([0.0, 2.0, 1.6], 1)) / 2
    loss = BankInfoNCELoss(temperature=0.5, hard_weight=4.0)(q, bank, positives, hard_ids=hard_ids)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    plain = BankInfoNCELoss(temperature=0.5)(q, bank, positives)
    assert torch.equal(BankInfoNCELoss(temperature=0.5, hard_weight=1.0)(q, bank, positives, hard_ids=hard_ids), plain)


def test_bank_loss_masks_exact_duplicates_of_the_positive():
    torch.manual_seed(1)
    bank = F.normalize(torch.randn(6, 8), dim=-1)
    bank[4] = bank[1]  # the same image under two ids
    q = F.normalize(torch.randn(2, 8), dim=-1)
    positives = torch.tensor([1, 3])
    groups = duplicate_groups(bank)
    assert groups[1] == groups[4] and len(set(groups.tolist())) == 5
    loss = BankInfoNCELoss(0.05)(q, bank, positives, groups)
    logits = q @ bank.T / 0.05
    rows = [[0, 1, 2, 3, 5], [0, 1, 2, 3, 4, 5]]  # row 0 drops row 4 (duplicate of its positive); row 1 keeps all
    expected = (_nll(logits[0, rows[0]].tolist(), 1) + _nll(logits[1, rows[1]].tolist(), 3)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # same as a bank without the duplicate row
    without = BankInfoNCELoss(0.05)(q[:1], bank[[0, 1, 2, 3, 5]], torch.tensor([1]))
    assert torch.allclose(BankInfoNCELoss(0.05)(q[:1], bank, positives[:1], groups), without)


def test_combiner_published_shapes():
    d = 640  # CLIP RN50x4: p = 2560, h = 5120
    combiner = Combiner(d)
    shapes = {name: tuple(p.shape) for name, p in combiner.named_parameters()}
    assert shapes["text_projection.weight"] == (2560, 640) and shapes["image_projection.weight"] == (2560, 640)
    assert shapes["combiner_layer.weight"] == (5120, 5120)
    assert shapes["output_layer.weight"] == (640, 5120)
    assert shapes["dynamic_scalar.0.weight"] == (5120, 5120) and shapes["dynamic_scalar.3.weight"] == (1, 5120)
    out = Combiner(32).eval()(torch.randn(3, 32), torch.randn(3, 32))
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_default_scale_and_temperature_are_the_published_ones():
    # CLIP4Cir stage 1 scales cosine logits by 100; SPN4CIR stage 2 divides them by a temperature of 0.02
    q = torch.tensor([[1.0, 0.0], [0.96, 0.28]])
    t = torch.tensor([[1.0, 0.0], [0.96, 0.28]])  # cosines: q0 -> [1, 0.96], q1 -> [0.96, 1]
    expected = (_nll([100.0, 96.0], 0) + _nll([96.0, 100.0], 1)) / 2
    assert math.isclose(InBatchContrastiveLoss()(q, t).item(), expected, rel_tol=1e-3)
    bank = t.flip(0)
    expected = (_nll([48.0, 50.0], 1) + _nll([50.0, 48.0], 0)) / 2
    assert math.isclose(BankInfoNCELoss()(q, bank, torch.tensor([1, 0])).item(), expected, rel_tol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_bank_loss_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match=rf"^temperature must be positive, got {temperature}$"):
        BankInfoNCELoss(temperature)


def test_image_id_zero_is_an_image_and_only_negative_ids_are_padding():
    mask = InBatchContrastiveLoss.duplicate_mask(torch.tensor([0, 3]), torch.tensor([0, 3, 1, 0, -1]))
    assert mask.tolist() == [[True, False, False, True, True], [False, True, False, False, True]]


def test_losses_stay_on_the_device_of_their_inputs():
    # the meta device checks device placement without a GPU: mixing a CPU tensor into meta inputs raises
    q, t = torch.randn(3, 4, device="meta"), torch.randn(3, 4, device="meta")
    ids = torch.tensor([5, 6, 5], device="meta")
    columns = torch.cat([ids, torch.tensor([6], device="meta")])  # 3 targets + 1 hard negative
    ignore = InBatchContrastiveLoss.duplicate_mask(ids, columns)
    assert InBatchContrastiveLoss()(q, t, t[:1], ignore).device.type == "meta"
    groups = torch.tensor([0, 1, 0], device="meta")
    assert BankInfoNCELoss()(q, t, torch.tensor([0, 1, 2], device="meta"), groups).device.type == "meta"
