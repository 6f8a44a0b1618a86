"""A CIR model: a backbone plus how a query (reference image + text) becomes one vector, and the
model-folder format every stage writes and every consumer (evaluate, index, serve) loads."""

from __future__ import annotations

import hashlib
import json

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import sentence_query
from ..errors import ModelError, one_line
from ..io import environment_info, file_sha1, fsync_dir, fsync_file, read_json, write_json
from .attributes import AttributeHeads, load_heads
from .backbone import Backbone
from .combiner import Combiner
from .factory import create_backbone
from .matcher import DescriptionMatcher

QUERY_MODES = ("image", "text", "sum", "sum_raw", "combiner")
PROMPT_SOURCES = ("catalog", "predicted", "none")
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
MATCHER_WEIGHTS_FILE = "matcher.pt"


def compose_query(mode: str, image_features: torch.Tensor, text_features: torch.Tensor, combiner: Combiner | None = None) -> torch.Tensor:
    """Normalised query vectors from unnormalised image and text features.

    ``sum`` normalises each side before adding (the usual zero-shot baseline); ``sum_raw`` adds the
    raw features and normalises the sum (CLIP4Cir's ``element_wise_sum``)."""
    if mode == "image":
        return F.normalize(image_features, dim=-1)
    if mode == "text":
        return F.normalize(text_features, dim=-1)
    if mode == "sum":
        return F.normalize(F.normalize(image_features, dim=-1) + F.normalize(text_features, dim=-1), dim=-1)
    if mode == "sum_raw":
        return F.normalize(image_features + text_features, dim=-1)
    if mode == "combiner":
        if combiner is None:
            raise ModelError("query mode 'combiner' needs a model with a Combiner head")
        return combiner(image_features, text_features)
    raise ModelError(f"unknown query mode {mode!r}; choose one of {QUERY_MODES}")


class CIRModel(nn.Module):
    """Backbone + query composition, optionally with a :class:`DescriptionMatcher` that scores the
    query text against each item's description too. ``saved_prefixes`` lists the state-dict prefixes
    that differ from what the backbone spec builds (trained parts); only those are written to disk."""

    def __init__(self, backbone: Backbone, query_mode: str = "sum", combiner: Combiner | None = None,
                 saved_prefixes: list[str] | None = None, text_template: str = "prompt", prompt_source: str = "catalog",
                 matcher: DescriptionMatcher | None = None):
        super().__init__()
        if query_mode not in QUERY_MODES:
            raise ModelError(f"unknown query mode {query_mode!r}; choose one of {QUERY_MODES}")
        self.backbone = backbone
        self.query_mode = query_mode
        self.combiner = combiner
        self.text_template = text_template
        if prompt_source not in PROMPT_SOURCES:
            raise ModelError(f"unknown prompt source {prompt_source!r}; choose one of {PROMPT_SOURCES}")
        self.prompt_source = prompt_source  # where the reference descriptions of its training prompts came from
        self.attribute_heads: AttributeHeads | None = None  # set by attach_heads / load when the folder has them
        self.matcher = matcher
        self.matcher_trained = False
        self.saved_prefixes = list(saved_prefixes or [])
        self.source: Path | None = None  # the model folder it was loaded from, if any
        self.descriptions_source: str | None = None  # the attributes file its prompts/descriptions came from

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return compose_query(mode or self.query_mode, image_features, text_features, self.combiner)

    # -- the vectors a query and a catalog item become; their inner product is the score ----------
    def item_vectors(self, image_features: torch.Tensor, description_features: torch.Tensor | None = None) -> torch.Tensor:
        """Catalog items: normalised image features, joined with description features [N, m] (zero
        rows for items without one) when the model has a matcher."""
        images = F.normalize(image_features.float(), dim=-1)
        if self.matcher is None:
            return images
        if description_features is None:
            description_features = images.new_zeros(len(images), self.matcher.dim)
        return self.matcher.join(images, description_features.to(images))

    def query_vectors(self, image_features: torch.Tensor | None, text_features: torch.Tensor | None,
                      matcher_features: torch.Tensor | None = None, mode: str | None = None) -> torch.Tensor:
        """Queries: the composed reference + text (the image alone, or the text alone, when the other
        is missing), joined with the matcher's query features when the model has a matcher."""
        if image_features is None and text_features is None:
            raise ModelError("a query needs a reference image, a text, or both")
        if image_features is None:
            composed = self.compose(text_features, text_features, mode="text")
        elif text_features is None:
            composed = self.compose(image_features, image_features, mode="image")
        else:
            composed = self.compose(image_features, text_features, mode)
        if self.matcher is None:
            return composed
        if matcher_features is None:
            matcher_features = composed.new_zeros(len(composed), self.matcher.dim)
        return self.matcher.join(composed, matcher_features.to(composed))

    def query_text(self, caption: str, reference_prompt: str | None = None) -> str:
        """The text side of a query: with the ``prompt`` template, the reference description joined
        with the caption (the prompt is shortened to fit the context, never the caption)."""
        if self.text_template == "prompt" and reference_prompt:
            return self.backbone.fit_query_text(reference_prompt, caption, sentence_query)
        return caption

    def attach_heads(self, heads: AttributeHeads | None) -> None:
        """Attribute heads predicting descriptions of images that have none (uploads)."""
        if heads is not None and heads.feature_dim != self.backbone.feature_dim:
            raise ModelError(f"attribute heads take {heads.feature_dim}-d features but the model's image features "
                             f"are {self.backbone.feature_dim}-d")
        self.attribute_heads = heads

    def predict_attributes(self, image_features: torch.Tensor) -> list[dict[str, dict[str, Any]]]:
        """Predicted attributes (value + confidence) per row of raw image features."""
        if self.attribute_heads is None:
            raise ModelError("this model has no attribute heads: train them with `fashion-cir attributes train --model DIR`")
        return self.attribute_heads.predict(image_features)

    def mark_trained(self, prefixes: list[str]) -> None:
        """Record trained parts as prefixes of this model's state dict, e.g.
        ``["backbone." + p for p in backbone.encoder_prefixes("text")]``."""
        for prefix in prefixes:
            if prefix not in self.saved_prefixes:
                self.saved_prefixes.append(prefix)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        portable = ["backbone." + p for p in self.backbone.portable_spec()[1]]
        prefixes = tuple(self.saved_prefixes + portable) + ("combiner.",)
        # the matcher is saved on its own (matcher.pt: its trained query encoder only)
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def fingerprint(self) -> str:
        """sha1 of everything that decides this model's scores: its settings (JSON, sorted keys),
        then each weight's name and bytes in name order (the matcher's query encoder once more).
        Results caches key on it, so the definition is pinned by a test."""
        digest = hashlib.sha1(json.dumps({"backbone": self.backbone.portable_spec()[0], "image": self.backbone.image_fingerprint(),
                                          "query_mode": self.query_mode, "text_template": self.text_template,
                                          "matcher": self.matcher.config() if self.matcher is not None else None},
                                         sort_keys=True).encode())
        states = [self.state_dict()] + ([self.matcher.trained_state()] if self.matcher is not None else [])
        for state in states:
            for name in sorted(state):
                digest.update(name.encode())
                digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``model.json`` (spec, query mode, text template, prompt source, head config,
        versions, sha1 of the weights), ``weights.pt`` and, when attached, the attribute heads.
        Order: new weights to a temporary file (fsynced), then ``model.json`` (atomic), then the
        weights renamed into place; a crash at any point leaves a folder that loads as the old
        model or the new one (see :meth:`load`), never a mismatched pair."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights_tmp = folder / f".{WEIGHTS_FILE}.tmp"
        torch.save(self.trained_state_dict(), weights_tmp)
        fsync_file(weights_tmp)
        matcher_tmp = folder / f".{MATCHER_WEIGHTS_FILE}.tmp"
        matcher_saved = self.matcher is not None and self.matcher_trained
        if matcher_saved:
            torch.save(self.matcher.trained_state(), matcher_tmp)
            fsync_file(matcher_tmp)
        write_json(folder / MODEL_FILE, {
            "format": "fashion-cir-model/1",
            "backbone": self.backbone.portable_spec()[0],
            "preprocess": self.backbone.preprocess_mode,
            "query_mode": self.query_mode,
            "text_template": self.text_template,
            "prompt_source": self.prompt_source,
            "combiner": self.combiner.config() if self.combiner is not None else None,
            "matcher": ({**self.matcher.config(), "trained": self.matcher_trained}
                        if self.matcher is not None else None),
            "matcher_sha1": file_sha1(matcher_tmp) if matcher_saved else None,
            "descriptions": self.descriptions_source,
            "saved_prefixes": self.saved_prefixes,
            "image_fingerprint": self.backbone.image_fingerprint(),
            "versions": environment_info(),
            "weights_sha1": file_sha1(weights_tmp),
            **(metadata or {}),
        })
        weights_tmp.replace(folder / WEIGHTS_FILE)
        if matcher_saved:
            matcher_tmp.replace(folder / MATCHER_WEIGHTS_FILE)
        else:
            (folder / MATCHER_WEIGHTS_FILE).unlink(missing_ok=True)
        fsync_dir(folder)
        if self.attribute_heads is not None:
            self.attribute_heads.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> "CIRModel":
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file():
            raise ModelError(f"not a fashion-cir model folder (no {MODEL_FILE}): {folder}")
        meta = read_json(folder / MODEL_FILE, "model file")
        for key in ("backbone", "query_mode"):
            if key not in meta:
                raise ModelError(f"{folder / MODEL_FILE}: missing field {key!r}")
        backbone = create_backbone(meta["backbone"], preprocess=meta.get("preprocess", "clip"))
        combiner = Combiner(backbone.feature_dim, **meta["combiner"]) if meta.get("combiner") else None
        matcher_meta = meta.get("matcher")
        matcher = None
        if matcher_meta:
            matcher = DescriptionMatcher(matcher_meta.get("spec", "minilm"), matcher_meta.get("template", "caption"),
                                         float(matcher_meta.get("weight", 0.5)))
        model = cls(backbone, meta["query_mode"], combiner, meta.get("saved_prefixes"), meta.get("text_template", "prompt"),
                    meta.get("prompt_source", "catalog"), matcher=matcher)
        if matcher is not None and matcher_meta.get("trained"):
            # a folder older than weight hashes names the file even when it is missing
            matcher_path = _weights_file(folder, meta.get("matcher_sha1"), MATCHER_WEIGHTS_FILE) or folder / MATCHER_WEIGHTS_FILE
            try:
                matcher.query_encoder.load_state_dict(torch.load(matcher_path, map_location=map_location, weights_only=True))
            except Exception as exc:
                raise ModelError(f"missing or corrupt matcher weights {matcher_path}: {one_line(exc)}") from exc
            model.matcher_trained = True
        weights_path = _weights_file(folder, meta.get("weights_sha1"))
        if weights_path is not None:
            try:
                state = torch.load(weights_path, map_location=map_location, weights_only=True)
            except Exception as exc:
                raise ModelError(f"corrupt weights file {weights_path}: {one_line(exc)}") from exc
            own_state = model.state_dict()
            missing_keys = [k for k in state if k not in own_state]
            if missing_keys:
                raise ModelError(f"{weights_path} does not match backbone {meta['backbone']}: unexpected {missing_keys[:3]}")
            wrong_shapes = [f"{k} {tuple(v.shape)} vs {tuple(own_state[k].shape)}" for k, v in state.items()
                            if tuple(v.shape) != tuple(own_state[k].shape)]
            if wrong_shapes:
                raise ModelError(f"{weights_path} does not match backbone {meta['backbone']}: shape mismatch {wrong_shapes[:3]}")
            model.load_state_dict(state, strict=False)
        expected = meta.get("image_fingerprint")
        if expected and expected != backbone.image_fingerprint():
            raise ModelError(f"{folder}: image encoder fingerprint mismatch after loading (expected {expected}); "
                             "the backbone weights it was trained from are not the ones available here")
        model.attach_heads(load_heads(folder))
        model.source = folder.resolve()
        model.descriptions_source = meta.get("descriptions")
        return model.eval()


def _weights_file(folder: Path, expected_sha1: str | None, name: str = WEIGHTS_FILE) -> Path | None:
    """The weights file ``name`` that belongs to ``model.json``, or, after a save interrupted
    between writing ``model.json`` and renaming the weights, the finished temporary file (the
    rename is completed when the folder is writable). ModelError when neither matches."""
    path, pending = folder / name, folder / f".{name}.tmp"
    if expected_sha1 is None:  # written before weights were hashed
        return path if path.is_file() else None
    if path.is_file() and file_sha1(path) == expected_sha1:
        return path
    if pending.is_file() and file_sha1(pending) == expected_sha1:
        try:
            pending.replace(path)
            return path
        except OSError:
            return pending
    raise ModelError(f"{path} does not match {folder / MODEL_FILE} (sha1 {expected_sha1}): a save was interrupted "
                     "or the files were mixed up; re-run the step that wrote the model")


def load_model(model_dir: str | Path | None = None, backbone: str | None = None, query_mode: str = "sum",
               preprocess: str = "clip") -> CIRModel:
    """A trained model folder, or a zero-shot model from a backbone spec."""
    if model_dir is not None:
        return CIRModel.load(model_dir)
    if backbone is None:
        raise ModelError("give a trained model folder (--model DIR) or a backbone spec (--backbone SPEC)")
    return CIRModel(create_backbone(backbone, preprocess=preprocess), query_mode).eval()


def publish_model(source: str | Path, destination: str | Path) -> Path:
    """Copy a model folder to ``destination``, replacing what was there (via a temporary folder)."""
    import shutil

    destination = Path(destination)
    staging = destination.with_name(f".{destination.name}.publishing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(destination, ignore_errors=True)
    staging.replace(destination)
    return destination
