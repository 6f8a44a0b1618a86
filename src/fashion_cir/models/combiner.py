"""CLIP4Cir's Combiner: a learned fusion of image and text features (p=4d, h=8d by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    """text, image -> Linear(d->p), ReLU, Dropout each; concat; Linear(2p->h), ReLU, Dropout,
    Linear(h->d); a dynamic scalar lambda from a parallel Linear(2p->h)->ReLU->Dropout->Linear(h->1)
    ->Sigmoid branch mixes in the raw inputs: normalize(out + lambda*text + (1-lambda)*image)."""

    def __init__(
        self, feature_dim: int, projection_dim: int | None = None, hidden_dim: int | None = None, dropout: float = 0.5
    ):
        super().__init__()
        self.feature_dim = feature_dim
        self.projection_dim = projection_dim or 4 * feature_dim
        self.hidden_dim = hidden_dim or 8 * feature_dim
        p, h = self.projection_dim, self.hidden_dim
        self.text_projection = nn.Linear(feature_dim, p)
        self.image_projection = nn.Linear(feature_dim, p)
        self.combiner_layer = nn.Linear(2 * p, h)
        self.output_layer = nn.Linear(h, feature_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, 1), nn.Sigmoid()
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def config(self) -> dict[str, int]:
        return {"projection_dim": self.projection_dim, "hidden_dim": self.hidden_dim}

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        text_proj = self.dropout1(F.relu(self.text_projection(text_features)))
        image_proj = self.dropout2(F.relu(self.image_projection(image_features)))
        joint = torch.cat([text_proj, image_proj], dim=-1)
        combined = self.dropout3(F.relu(self.combiner_layer(joint)))
        weight = self.dynamic_scalar(joint)
        output = self.output_layer(combined) + weight * text_features + (1 - weight) * image_features
        return F.normalize(output, dim=-1)
