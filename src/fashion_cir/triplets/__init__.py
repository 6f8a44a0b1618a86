"""Attribute-aware triplet generation: pair mining on static features, relative captions, hard negatives."""

from .config import TripletConfig
from .generate import generate_triplets, write_triplets

__all__ = ["TripletConfig", "generate_triplets", "write_triplets"]
