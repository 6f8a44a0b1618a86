"""Fitting fusion weights: a term that ranks the targets gets the weight, a noisy one does not,
and a removed reference never counts as a negative."""

from __future__ import annotations

import numpy as np
import torch

from fashion_cir.models.fusion import Fusion
from fashion_cir.training.fusion import FusionConfig, fit_fusion


class TermScores:
    """The three things fit_fusion reads of a prepared set, given as plain arrays."""

    def __init__(self, terms: dict[str, torch.Tensor], targets: np.ndarray, references: np.ndarray | None):
        self.terms, self.targets, self.references = terms, targets, references
        self.columns = {"p": np.arange(next(iter(terms.values())).shape[1])}

    def target_columns(self, protocol):
        return self.targets

    def reference_columns(self, protocol):
        return self.references

    def term_scores(self, protocol, mode=None):
        return self.terms


def test_the_informative_term_gets_the_weight():
    generator = torch.Generator().manual_seed(0)
    queries, gallery = 60, 40
    targets = torch.randint(0, gallery, (queries,), generator=generator)
    informative = torch.rand(queries, gallery, generator=generator) * 0.2
    informative[torch.arange(queries), targets] += 1.0
    noise = torch.rand(queries, gallery, generator=generator)
    prepared = {"s": TermScores({"composed": noise, "caption": informative}, targets.numpy(), None)}
    fusion, summary = fit_fusion(prepared, "p", FusionConfig(steps=30))
    assert isinstance(fusion, Fusion)
    assert fusion.caption > 0.5 and abs(fusion.composed) < fusion.caption / 4
    assert summary["loss"] < summary["loss_plain_composed"] and summary["queries"] == queries


def test_queries_without_target_are_left_out_and_removed_references_are_masked():
    queries, gallery = 8, 5
    targets = np.array([0, 1, 2, 3, -1, 0, 1, 2])
    references = np.full(queries, 4)  # column 4 is every query's reference: it scores highest on "reference"
    reference = torch.zeros(queries, gallery)
    reference[:, 4] = 5.0
    caption = torch.zeros(queries, gallery)
    caption[np.arange(queries)[targets >= 0], targets[targets >= 0]] = 1.0
    prepared = {"s": TermScores({"reference": reference, "caption": caption}, targets, references)}
    fusion, summary = fit_fusion(prepared, "p", FusionConfig(steps=10))
    assert summary["queries"] == 7
    # column 4 is masked: the reference term's only effect is gone, so it keeps its start (0); unmasked,
    # the fit pushes it down to rank the targets above the reference
    unmasked, _ = fit_fusion(
        {"s": TermScores({"reference": reference, "caption": caption}, targets, None)}, "p", FusionConfig(steps=10)
    )
    assert fusion.reference == 0.0 and unmasked.reference < -0.1
