"""Fitting a model's fusion weights (:class:`~fashion_cir.models.fusion.Fusion`): one weight per
query term, learned by softmax cross-entropy of each training query's target against a whole
gallery, from term score matrices computed once (the fused score is linear in the weights)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..errors import FashionCIRError
from ..evaluation.evaluate import PreparedSet
from ..models.fusion import Fusion


class FusionConfig(Config):
    """Optimiser settings of the fit (full-batch L-BFGS on the weights and a logit scale)."""

    steps: int = 30
    initial_scale: float = 20.0


def fit_fusion(
    prepared: Mapping[str, PreparedSet], protocol: str, config: FusionConfig = FusionConfig(), mode: str | None = None
) -> tuple[Fusion, dict]:
    """The fusion whose fused scores best rank each query's target within ``protocol``'s gallery
    (sets prepared with every term), and a summary (loss before and after, queries used)."""
    scores, targets, masks = [], [], []
    for prepared_set in prepared.values():
        columns = torch.from_numpy(prepared_set.target_columns(protocol))
        keep = (columns >= 0).nonzero().squeeze(1)
        if not len(keep):
            continue
        terms = prepared_set.term_scores(protocol, mode)
        scores.append({t: s[keep] for t, s in terms.items()})
        targets.append(columns[keep])
        mask = torch.zeros(len(keep), len(prepared_set.columns[protocol]))
        references = prepared_set.reference_columns(protocol)
        if references is not None:
            for row, (reference, target) in enumerate(zip(references[keep.numpy()], columns[keep].tolist())):
                if reference >= 0 and reference != target:
                    mask[row, reference] = float("-inf")
        masks.append(mask)
    if not targets:
        raise FashionCIRError(f"fusion: no training query has its target in the {protocol!r} gallery")
    names = sorted(set.intersection(*(set(s) for s in scores)))
    weights = torch.zeros(len(names), requires_grad=True)
    log_scale = torch.tensor(float(np.log(config.initial_scale)), requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, log_scale], max_iter=config.steps, line_search_fn="strong_wolfe")
    count = sum(len(t) for t in targets)

    def loss() -> torch.Tensor:
        total = torch.zeros(())
        for terms, target, mask in zip(scores, targets, masks):
            logits = sum(w * terms[n] for w, n in zip(weights, names))
            total = total + F.cross_entropy(log_scale.exp() * logits + mask, target, reduction="sum")
        return total / count

    with torch.no_grad():
        if "composed" in names:  # start from the plain composed query
            weights[names.index("composed")] = 1.0
        start = float(loss())

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    optimiser.step(closure)
    fitted = {n: round(float(w), 4) for n, w in zip(names, weights.detach())}
    with torch.no_grad():
        final = float(loss())
    return Fusion.from_weights(fitted), {
        "queries": count,
        "terms": len(names),
        "loss_plain_composed": round(start, 4),
        "loss": round(final, 4),
        "scale": round(float(log_scale.detach().exp()), 3),
    }
