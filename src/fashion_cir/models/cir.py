"""A CIR model: a backbone plus how a query (reference image + text) becomes one vector, and the
model-folder format every stage writes and every consumer (evaluate, index, serve) loads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import sentence_query
from ..errors import ModelError, one_line
from ..io import environment_info, file_sha1, fsync_dir, fsync_file, read_json, write_json
from ..language.changes import read_changes
from .attributes import AttributeHeads, load_heads
from .backbone import Backbone
from .combiner import Combiner
from .factory import create_backbone
from .fusion import DESCRIPTION_TERMS, AttributeSpace, Fusion, QueryParts, fuse_terms, item_blocks
from .matcher import DescriptionMatcher, hash_state

QUERY_MODES = ("image", "text", "sum", "sum_raw", "combiner")
PROMPT_SOURCES = ("catalog", "predicted", "none")
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
MATCHER_WEIGHTS_FILE = "matcher.pt"


def compose_query(
    mode: str, image_features: torch.Tensor, text_features: torch.Tensor, combiner: Combiner | None = None
) -> torch.Tensor:
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
    """Backbone + query composition, optionally with a :class:`DescriptionMatcher` (items are read
    by their descriptions too) and an :class:`~.fusion.AttributeSpace` (items are matched on their
    attributes); :class:`~.fusion.Fusion` weighs the terms of a query (see :mod:`.fusion`).
    ``saved_prefixes`` lists the state-dict prefixes that differ from what the backbone spec builds
    (trained parts); only those are written to disk."""

    def __init__(
        self,
        backbone: Backbone,
        query_mode: str = "sum",
        combiner: Combiner | None = None,
        saved_prefixes: list[str] | None = None,
        text_template: str = "prompt",
        prompt_source: str = "catalog",
        matcher: DescriptionMatcher | None = None,
        fusion: Fusion | None = None,
        attribute_space: AttributeSpace | None = None,
    ):
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
        self.attribute_space = attribute_space
        self.fusion = fusion or (Fusion(composed=0.5, caption=0.5) if matcher is not None else Fusion())
        self.saved_prefixes = list(saved_prefixes or [])
        self.source: Path | None = None  # the model folder it was loaded from, if any
        self.descriptions_source: str | None = None  # the attributes file its prompts/descriptions came from

    def compose(
        self, image_features: torch.Tensor, text_features: torch.Tensor, mode: str | None = None
    ) -> torch.Tensor:
        return compose_query(mode or self.query_mode, image_features, text_features, self.combiner)

    # -- the vectors a query and a catalog item become; their inner product is the score ----------
    def block_dims(self) -> dict[str, int]:
        """The blocks of this model's item vectors and their widths."""
        dims = {"image": self.backbone.feature_dim}
        if self.matcher is not None:
            dims["description"] = self.matcher.dim
        if self.attribute_space is not None:
            dims["attributes"] = self.attribute_space.dim
        return dims

    def item_vectors(
        self,
        image_features: torch.Tensor,
        description_features: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Catalog items: their blocks joined (a block the model has but the items lack is zero)."""
        blocks = item_blocks(image_features, description_features, attributes)
        return torch.cat(
            [
                blocks.get(name, blocks["image"].new_zeros(len(image_features), dim))
                for name, dim in self.block_dims().items()
            ],
            dim=-1,
        )

    def query_terms(self, parts: QueryParts, mode: str | None = None) -> dict[str, torch.Tensor]:
        """Each term of the queries (unweighted), as a vector in its block (see :mod:`.fusion`)."""
        reference, text = parts.reference, parts.text
        if reference is None and text is None and parts.caption is None:
            raise ModelError("a query needs a reference image, a text, or both")
        terms: dict[str, torch.Tensor] = {}
        if reference is not None and text is not None:
            terms["composed"] = self.compose(reference, text, mode)
        elif reference is not None:
            terms["composed"] = F.normalize(reference, dim=-1)
        elif text is not None:
            terms["composed"] = F.normalize(text, dim=-1)
        if reference is not None:
            terms["reference"] = F.normalize(reference, dim=-1)
        if self.matcher is not None:
            for name in DESCRIPTION_TERMS:
                if getattr(parts, name) is not None:
                    terms[name] = getattr(parts, name)
        if self.attribute_space is not None and parts.attributes:
            terms.update(parts.attributes)
        return terms

    def query_vectors(self, parts: QueryParts, mode: str | None = None, fusion: Fusion | None = None) -> torch.Tensor:
        """Queries as vectors whose inner product with :meth:`item_vectors` is the fused score;
        ``fusion`` overrides the model's weights (e.g. while fitting them)."""
        terms = self.query_terms(parts.to(self.backbone.device), mode)
        like = next(iter(terms.values()))
        return fuse_terms(terms, fusion or self.fusion, self.block_dims(), len(like), like.float())

    def query_text(self, caption: str, reference_prompt: str | None = None) -> str:
        """The text tower's side of a query: with the ``prompt`` template, the reference description
        joined with the caption (the prompt is shortened to fit the context, never the caption)."""
        if self.text_template == "prompt" and reference_prompt:
            return self.backbone.fit_query_text(reference_prompt, caption, sentence_query)
        return caption

    @property
    def shares_text(self) -> bool:
        """Whether the text tower's pass over the query text also gives the ``prompt`` term (a
        matcher sharing the text tower, and the prompt template: one pass, both sides)."""
        return self.matcher is not None and self.matcher.shared and self.text_template == "prompt"

    def needs(self, term: str, fusion: Fusion | None = None) -> bool:
        """Whether queries must compute ``term`` (its weight is not zero, or ``fusion`` is None:
        every term, e.g. to fit the weights)."""
        return fusion is None or fusion.weight(term) != 0.0

    @torch.no_grad()
    def encode_queries(
        self,
        reference_features: torch.Tensor | None,
        captions: Sequence[str],
        descriptions: Sequence[str | None] | None = None,
        reference_attributes: Sequence[Mapping[str, Any] | None] | None = None,
        batch_size: int = 256,
        all_terms: bool = False,
        described: Mapping[str, torch.Tensor] | None = None,
        captions_encoded: torch.Tensor | None = None,
    ) -> QueryParts:
        """The parts of queries made of reference image features [n, d] (or None), captions (all
        empty: the reference alone, "more like this"), each reference's description and attributes
        (None: none). Only the terms the model's fusion weighs are computed unless ``all_terms``.
        Work already done is passed in: ``described`` maps descriptions to their item-side features
        (the catalog's description bank), ``captions_encoded`` are these captions' caption term."""
        n = len(captions)
        descriptions = list(descriptions) if descriptions is not None else [None] * n
        attributes = list(reference_attributes) if reference_attributes is not None else [None] * n
        if len(descriptions) != n or len(attributes) != n:
            raise ValueError(
                f"{n} captions but {len(descriptions)} descriptions and {len(attributes)} attribute records"
            )
        fusion = None if all_terms else self.fusion
        was_training = self.training
        if was_training:
            self.eval()
        has_text = any(c.strip() for c in captions)
        texts = tuple(self.query_text(c, d) for c, d in zip(captions, descriptions)) if has_text else ()
        parts = QueryParts(reference_features, None, texts=texts)
        caption_term = self.matcher is not None and has_text and self.needs("caption", fusion)
        if has_text and self.shares_text and self.matcher is not None:
            # one pass of the query encoder over the query texts and (when needed) the captions
            with_captions = caption_term and captions_encoded is None
            pooled = self.matcher.pool(list(texts) + (list(captions) if with_captions else []), batch_size)
            if with_captions:
                pooled, captions_encoded = pooled[:n], F.normalize(pooled[n:], dim=-1)
            text = self.backbone.project_text(pooled.to(self.backbone.device)).float().cpu()
            parts.text, parts.prompt = text, F.normalize(pooled, dim=-1)
        elif has_text:
            parts.text = self.backbone.embed_texts(list(texts), batch_size)
        if self.matcher is not None:
            if caption_term:
                parts.caption = (
                    captions_encoded
                    if captions_encoded is not None
                    else self.matcher.embed(list(captions), side="query")
                )
            if has_text and self.needs("prompt", fusion) and parts.prompt is None:
                parts.prompt = self.matcher.embed(
                    [sentence_query(d, c) for c, d in zip(captions, descriptions)], side="query"
                )
            if reference_features is not None and self.needs("reference_description", fusion):
                known = described or {}
                parts.reference_description = self.matcher.embed_optional(
                    [d if d not in known else None for d in descriptions], side="item"
                )
                for row, description in enumerate(descriptions):
                    if description is not None and description in known:
                        parts.reference_description[row] = known[description]
        if self.attribute_space is not None:
            rows = [
                self.attribute_space.query_rows(a if reference_features is not None else None, read_changes(c))
                for c, a in zip(captions, attributes)
            ]
            parts.attributes = {term: torch.stack([r[term] for r in rows]) for term in self.attribute_space.terms()}
        if was_training:
            self.train()
        return parts

    def attach_heads(self, heads: AttributeHeads | None) -> None:
        """Attribute heads predicting descriptions of images that have none (uploads)."""
        if heads is not None and heads.feature_dim != self.backbone.feature_dim:
            raise ModelError(
                f"attribute heads take {heads.feature_dim}-d features but the model's image features "
                f"are {self.backbone.feature_dim}-d"
            )
        self.attribute_heads = heads

    def predict_attributes(self, image_features: torch.Tensor) -> list[dict[str, dict[str, Any]]]:
        """Predicted attributes (value + confidence) per row of raw image features."""
        if self.attribute_heads is None:
            raise ModelError(
                "this model has no attribute heads: train them with `fashion-cir attributes train --model DIR`"
            )
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
        digest = hashlib.sha1(
            json.dumps(
                {
                    "backbone": self.backbone.portable_spec()[0],
                    "image": self.backbone.image_fingerprint(),
                    "query_mode": self.query_mode,
                    "text_template": self.text_template,
                    "matcher": self.matcher.config() if self.matcher is not None else None,
                    "fusion": self.fusion.model_dump(mode="json"),
                    "attributes": self.attribute_space.names if self.attribute_space else None,
                },
                sort_keys=True,
            ).encode()
        )
        states = [self.state_dict()] + ([self.matcher.trained_state()] if self.matcher is not None else [])
        for state in states:
            hash_state(digest, state)
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
        if self.matcher is not None and matcher_saved:
            torch.save(self.matcher.trained_state(), matcher_tmp)
            fsync_file(matcher_tmp)
        write_json(
            folder / MODEL_FILE,
            {
                "format": "fashion-cir-model/1",
                "backbone": self.backbone.portable_spec()[0],
                "preprocess": self.backbone.preprocess_mode,
                "query_mode": self.query_mode,
                "text_template": self.text_template,
                "prompt_source": self.prompt_source,
                "combiner": self.combiner.config() if self.combiner is not None else None,
                "matcher": (
                    {**self.matcher.config(), "trained": self.matcher_trained} if self.matcher is not None else None
                ),
                "matcher_sha1": file_sha1(matcher_tmp) if matcher_saved else None,
                "fusion": self.fusion.model_dump(mode="json"),
                "attributes": {"names": self.attribute_space.names} if self.attribute_space is not None else None,
                "descriptions": self.descriptions_source,
                "saved_prefixes": self.saved_prefixes,
                "image_fingerprint": self.backbone.image_fingerprint(),
                "versions": environment_info(),
                "weights_sha1": file_sha1(weights_tmp),
                **(metadata or {}),
            },
        )
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
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> CIRModel:
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
            shared = None
            if matcher_meta.get("shared"):
                shared = getattr(backbone, "text_tower", None)
                if not isinstance(shared, nn.Module):
                    raise ModelError(
                        f"{folder / MODEL_FILE}: a shared description matcher needs a backbone with a text "
                        f"tower; {backbone.spec} has none"
                    )
            matcher = DescriptionMatcher(matcher_meta.get("spec", "minilm"), query_encoder=shared)
        space = AttributeSpace(names=meta["attributes"]["names"]) if meta.get("attributes") else None
        model = cls(
            backbone,
            meta["query_mode"],
            combiner,
            meta.get("saved_prefixes"),
            meta.get("text_template", "prompt"),
            meta.get("prompt_source", "catalog"),
            matcher=matcher,
            fusion=_recorded_fusion(meta, folder),
            attribute_space=space,
        )
        if matcher is not None and matcher_meta.get("trained"):
            # a folder older than weight hashes names the file even when it is missing
            matcher_path = (
                _weights_file(folder, meta.get("matcher_sha1"), MATCHER_WEIGHTS_FILE) or folder / MATCHER_WEIGHTS_FILE
            )
            try:
                matcher.query_encoder.load_state_dict(
                    torch.load(matcher_path, map_location=map_location, weights_only=True)
                )
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
                raise ModelError(
                    f"{weights_path} does not match backbone {meta['backbone']}: unexpected {missing_keys[:3]}"
                )
            wrong_shapes = [
                f"{k} {tuple(v.shape)} vs {tuple(own_state[k].shape)}"
                for k, v in state.items()
                if tuple(v.shape) != tuple(own_state[k].shape)
            ]
            if wrong_shapes:
                raise ModelError(
                    f"{weights_path} does not match backbone {meta['backbone']}: shape mismatch {wrong_shapes[:3]}"
                )
            model.load_state_dict(state, strict=False)
        expected = meta.get("image_fingerprint")
        if expected and expected != backbone.image_fingerprint():
            raise ModelError(
                f"{folder}: image encoder fingerprint mismatch after loading (expected {expected}); "
                "the backbone weights it was trained from are not the ones available here"
            )
        model.attach_heads(load_heads(folder))
        model.source = folder.resolve()
        model.descriptions_source = meta.get("descriptions")
        return model.eval()


def _recorded_fusion(meta: dict[str, Any], folder: Path) -> Fusion | None:
    """The fusion ``model.json`` records; a folder from before fusions records a matcher weight
    (caption or prompt template) instead, which is the same score."""
    if meta.get("fusion") is not None:
        return Fusion.from_dict(meta["fusion"], f"{folder / MODEL_FILE} field fusion")
    matcher = meta.get("matcher")
    if not matcher:
        return None
    weight = float(matcher.get("weight", 0.5))
    return Fusion.from_weights({"composed": 1.0 - weight, matcher.get("template", "caption"): weight})


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
    raise ModelError(
        f"{path} does not match {folder / MODEL_FILE} (sha1 {expected_sha1}): a save was interrupted "
        "or the files were mixed up; re-run the step that wrote the model"
    )


def load_model(
    model_dir: str | Path | None = None, backbone: str | None = None, query_mode: str = "sum", preprocess: str = "clip"
) -> CIRModel:
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
