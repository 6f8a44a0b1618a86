"""Combiner forward pass against a second, plain implementation written from CLIP4Cir's description."""

from __future__ import annotations

import pytest
import torch

from fashion_cir.models.combiner import Combiner


def _reference(c: Combiner, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eval-mode Combiner from its weights alone: x @ W.T + b, ReLU as max(0, x), sigmoid as 1 / (1 + e^-x)."""
    linear = lambda layer, x: x @ layer.weight.T + layer.bias  # noqa: E731
    relu = lambda x: x.clamp(min=0)  # noqa: E731
    joint = torch.cat([relu(linear(c.text_projection, text)), relu(linear(c.image_projection, image))], dim=1)
    hidden = relu(linear(c.combiner_layer, joint))
    lam = 1 / (1 + torch.exp(-linear(c.dynamic_scalar[3], relu(linear(c.dynamic_scalar[0], joint)))))
    out = linear(c.output_layer, hidden) + lam * text + (1 - lam) * image
    return out / out.norm(dim=1, keepdim=True)


def test_eval_forward_matches_a_plain_reimplementation():
    torch.manual_seed(0)
    combiner = Combiner(6, 5, 7).eval()
    image, text = torch.randn(4, 6), torch.randn(4, 6) * 3  # text and image differ in scale: swapping them shows
    with torch.no_grad():
        out = combiner(image, text)
        assert torch.allclose(out, _reference(combiner, image, text), atol=1e-6)
        assert not torch.allclose(out, _reference(combiner, text, image), atol=1e-3)


def test_the_dynamic_scalar_mixes_text_with_weight_lambda_and_image_with_one_minus_lambda():
    # zero every learned path except the scalar's bias: output = normalize(lambda * text + (1 - lambda) * image)
    combiner = Combiner(2, 3, 4).eval()
    with torch.no_grad():
        for p in combiner.parameters():
            p.zero_()
        combiner.dynamic_scalar[3].bias.fill_(torch.logit(torch.tensor(0.25)).item())  # lambda = 0.25
        out = combiner(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[0.75, 0.25]]) / (0.75**2 + 0.25**2) ** 0.5)


def test_default_dims_and_config():
    combiner = Combiner(3)
    assert combiner.config() == {"projection_dim": 12, "hidden_dim": 24}
    assert Combiner(3, 5, 7).config() == {"projection_dim": 5, "hidden_dim": 7}
    assert combiner.feature_dim == 3


@pytest.mark.parametrize("dropout", [0.5, 0.2])
def test_training_mode_applies_the_given_dropout_on_every_branch(dropout):
    combiner = Combiner(4, 8, 16, dropout=dropout)
    drops = [m for m in combiner.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 4 and all(m.p == dropout for m in drops)
    torch.manual_seed(1)
    image, text = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        assert not torch.allclose(combiner.train()(image, text), _reference(combiner, image, text), atol=1e-3)
        assert torch.allclose(combiner.eval()(image, text), _reference(combiner, image, text), atol=1e-6)


def test_leading_batch_dimensions_are_just_more_rows():
    # features come as [..., d] (e.g. [queries, candidates, d]); each row is fused and normalised on its own
    torch.manual_seed(2)
    combiner = Combiner(6, 5, 7).eval()
    image, text = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with torch.no_grad():
        out = combiner(image, text)
        flat = _reference(combiner, image.reshape(6, 6), text.reshape(6, 6))
    assert out.shape == (2, 3, 6) and torch.allclose(out.reshape(6, 6), flat, atol=1e-6)
