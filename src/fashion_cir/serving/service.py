"""The search service without HTTP: one index followed live, the model that searches it, the
reference policy and the limits, and the operations the API offers (status, browse, item, image
file, search with an uploaded or catalog reference, each result explained). Refusals are
:class:`ServiceError` with the HTTP status the API answers; ``serving/app.py`` only parses HTTP,
calls this and maps errors to statuses. Uploads are decoded at reduced size within a pixel limit
sized to the model's input and an aspect ratio of at most 8:1, and at most a few decode and encode
at once; images are served only from inside the index's catalog root; a request is answered from
one version of the index. Imports no web framework."""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from ..captioning.base import Captioner
from ..data.images import (
    IMAGE_EXTENSIONS,
    MAX_ASPECT,
    ImageTooLarge,
    ImageTooThin,
    id_problem,
    open_image,
    upload_pixel_limit,
)
from ..errors import DataError, FashionCIRError
from ..models.cir import CIRModel
from ..retrieval.explain import attribute_values, explain, phrase, requested_changes
from ..retrieval.folder import LiveIndex, index_model
from ..retrieval.policy import CATALOG, ReferencePolicy
from ..retrieval.query import RequestError, SearchRequest
from ..retrieval.store import CatalogStore
from .describer import UploadDescriber
from .limits import Busy, ConcurrencyLimit

MB = 1 << 20
_SERVER_PATH = re.compile(r"(?<![\w.~<>-])/[^\s'\"/:,;()]+(?:/[^\s'\"/:,;()]+)*/?")


class ServiceError(FashionCIRError):
    """A request the service refuses: ``status`` is the HTTP status the API answers with, and
    ``retry_after`` (seconds) says when a busy service may take it."""

    def __init__(self, message: str, status: int, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; ``max_pixels`` None: 16x the model's input on each side."""

    max_upload_bytes: int = 10 * MB
    max_pixels: int | None = None
    max_k: int = 100
    max_text_chars: int = 300


class SearchService:
    """Composed search over ``index`` with ``model``. ``exclude_reference`` leaves a catalog
    reference out of its own results; ``upload_workers`` uploads decode and encode at once,
    ``upload_queue`` more wait (holding only their raw bytes), further ones are refused (503).
    ``int8_queries``: the description matcher reads queries with int8 weights (faster; rankings
    change a little: BENCHMARKS.md, "int8 query encoder"). ``upload_captioner``: the MLLM that
    describes an uploaded reference (:class:`~fashion_cir.serving.describer.UploadDescriber`;
    None: the attribute heads do)."""

    def __init__(
        self,
        index: LiveIndex,
        model: CIRModel,
        *,
        policy: ReferencePolicy = CATALOG,
        limits: Limits = Limits(),
        exclude_reference: bool = True,
        upload_workers: int = 2,
        upload_queue: int = 16,
        int8_queries: bool = False,
        upload_captioner: Captioner | None = None,
    ):
        self.index, self.model, self.policy = index, model, policy
        self.describer = UploadDescriber(upload_captioner) if upload_captioner is not None else None
        self.input_size = model.backbone.image_size
        self.limits = replace(limits, max_pixels=limits.max_pixels or upload_pixel_limit(self.input_size))
        self.exclude_reference = exclude_reference
        self.uploads = ConcurrencyLimit(upload_workers, upload_queue)
        # a search encodes a few short texts: ONNX Runtime does that faster than PyTorch on a CPU
        onnx = model.matcher is not None and model.matcher.use_onnx(query_int8=int8_queries)
        self.text_engine = ("onnxruntime-int8" if int8_queries else "onnxruntime") if onnx else "pytorch"

    @classmethod
    def open(
        cls, index_folder: str | Path, model: CIRModel | str | Path | None = None, **options: Any
    ) -> SearchService:
        """The service for ``index_folder``. ``model``: a CIRModel, a model folder, a backbone spec,
        or None for the model the index records; its image fingerprint must match the index."""
        cir = index_model(index_folder, model)
        return cls(LiveIndex(index_folder, cir), cir, **options)

    def public(self, message: str) -> str:
        """``message`` without server paths: the index folder reads ``<index>``, any other ``<path>``."""
        folder = self.index.folder
        for text in sorted({str(folder), str(folder.resolve())}, key=len, reverse=True):
            message = message.replace(text, "<index>")
        return _SERVER_PATH.sub("<path>", message)

    def status(self) -> dict[str, Any]:
        """Whether the index answers (``degraded`` with the problem when a change could not be
        opened), its size, backbone, store, two-stage and memory-map settings, filterable fields,
        the model's query mode, what runs its description matcher's encoders and which MLLM (if
        any) describes uploads."""
        current, problem = self.index.current(), self.index.problem  # read once: a request may change them
        state = {"status": "degraded", "problem": self.public(problem)} if problem else {"status": "ok"}
        return {
            **state,
            "items": len(current),
            "backbone": current.config["backbone"],
            "fingerprint": current.fingerprint,
            "store": current.store_kind,
            "factory": current.config["factory"],
            "candidates": current.config.get("candidates"),  # two-stage search (retrieval/rescore.py)
            "mmap": bool(getattr(current, "mapped", False)),
            "filter_fields": current.fields,
            "query_mode": self.model.query_mode,
            "attribute_heads": self.model.attribute_heads is not None,
            "text_engine": self.text_engine,
            "upload_captioner": self.describer.model_id if self.describer else None,
        }

    def browse(self, n: int = 24, seed: int = 0, words: str = "") -> dict[str, Any]:
        """A sample of ``n`` items (fixed by ``seed``) among those whose metadata holds every word
        of ``words`` (any order, any case), with the catalog's size and how many matched."""
        records = list(self.index.current().metadata.items())  # one read of the store, whatever the catalog size
        wanted = words.lower().split()
        matched = [(i, m) for i, m in records if all(word in _catalog_text(m) for word in wanted)]
        chosen = random.Random(seed).sample(matched, min(n, len(matched)))
        return {"total": len(records), "matched": len(matched), "items": [item_view(i, m) for i, m in chosen]}

    def item(self, item_id: str) -> dict[str, Any]:
        current = self.index.current()
        return item_view(_known(current, item_id), current.metadata.get(item_id, {}))

    def image_file(self, item_id: str) -> Path:
        """The image file of an item, only when it is an image inside the index's catalog root."""
        current = self.index.current()
        path = Path(current.paths[_known(current, item_id)])
        root = os.path.normpath(current.config.get("root") or "/nonexistent")
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not os.path.normpath(path).startswith(
            root.rstrip(os.sep) + os.sep
        ):
            raise ServiceError(f"item {item_id!r} has no image file inside the catalog", 404)
        if not path.is_file():
            raise ServiceError(f"the image file of item {item_id!r} is missing on the server", 404)
        return path

    def request(self, **fields: Any) -> SearchRequest:
        """A :class:`SearchRequest` under this service's rules: exactly one reference, a text unless
        ``similar``, at most ``max_text_chars``, at most ``max_k`` results, a catalog reference left
        out as configured."""
        if fields.get("k", 0) > self.limits.max_k:
            raise RequestError(f"k is {fields['k']}: at most {self.limits.max_k} results are served at once", 422)
        return SearchRequest(
            **fields,
            exclude_reference=self.exclude_reference,
            reference_required=True,
            text_required=True,
            max_text_chars=self.limits.max_text_chars,
        )

    def search(self, request: SearchRequest, upload: bytes | None = None, upload_name: str | None = None) -> dict:
        """One page of results for ``request``, each with its rank, score and what of the requested
        change it matches; ``upload`` holds the raw reference image when ``request.image``."""
        current = self.index.current()  # the whole request is answered from this version
        parsed = request.parsed_filter(current.fields)
        raw = self._checked_upload(upload) if request.image else b""
        reference_id = None if request.image else _known(current, request.item_id)
        start = time.perf_counter()
        try:
            with self.uploads.slot() if request.image else contextlib.nullcontext():
                reference = self._decode_upload(raw) if request.image else None
                record, problem = self._describe_upload(raw, reference) if reference is not None else (None, None)
                result = request.run(self.model, current, reference, parsed, self.policy, upload_record=record)
        except Busy:
            raise ServiceError(
                f"too many uploads are being processed ({self.uploads.workers} at once, "
                f"{self.uploads.queue} waiting); retry in a moment",
                503,
                retry_after=1,
            ) from None
        took = round((time.perf_counter() - start) * 1000, 2)
        if problem:  # the MLLM gave no record: say what described the photo instead
            fallback = (
                "the attribute heads described it" if result.prompt_source == "predicted" else "it has no description"
            )
            problem = f"{problem}; {fallback}"
        requested = requested_changes(result.query_text and request.text)
        reference_values = attribute_values(result.reference_attributes)
        results = []
        for rank, hit in enumerate(result.hits, request.offset + 1):
            view = item_view(hit.id, hit.metadata, hit.score, rank)  # not the live index's: it may have changed
            view["match"] = explain(requested, reference_values, hit.metadata)
            results.append(view)
        if reference_id is None:
            reference_view: dict[str, Any] = {"id": None, "upload": upload_name}
        else:
            reference_view = item_view(reference_id, current.metadata.get(reference_id, {}))
        return {
            "reference": reference_view,
            "reference_attributes": result.reference_attributes,
            "prompt": {
                "source": result.prompt_source,
                "description": result.description,
                **({"problem": self.public(problem)} if problem else {}),
            },
            "text": request.query_text,
            "query_text": result.query_text,
            "requested": {name: phrase(name, value) for name, value in requested.items()},
            "filter": request.filter.strip() or None,
            "filters": result.filters,
            "k": request.k,
            "offset": request.offset,
            "more": result.more,
            "took_ms": took,
            "results": results,
        }

    def _describe_upload(self, raw: bytes, photo: Image.Image) -> tuple[dict[str, Any] | None, str | None]:
        """The MLLM's record of an uploaded reference (when one describes uploads under this policy)."""
        if self.describer is None or self.policy.source != "catalog":
            return None, None
        return self.describer.describe(raw, photo)

    def _checked_upload(self, raw: bytes | None) -> bytes:
        limit = self.limits.max_upload_bytes
        if raw is not None and len(raw) > limit:
            raise ServiceError(f"uploaded image is larger than the limit of {limit / MB:.1f} MB", 413)
        if not raw:
            raise ServiceError("uploaded image is empty", 400)
        return raw

    def _decode_upload(self, raw: bytes) -> Image.Image:
        """Decode an uploaded reference image or say what is wrong with it; the pixel limit and the
        aspect ratio are checked from the header, before the pixels are decoded."""
        max_pixels = self.limits.max_pixels or 0
        try:
            return open_image(
                raw, max_pixels=max_pixels, name="uploaded image", target_size=self.input_size, max_aspect=MAX_ASPECT
            )
        except ImageTooLarge as exc:
            raise ServiceError(str(exc), 413) from exc
        except ImageTooThin as exc:
            raise ServiceError(str(exc), 422) from exc
        except DataError as exc:
            cause = exc.__cause__
            if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
                raise ServiceError(
                    f"uploaded image has too many pixels: the limit is {max_pixels:,} pixels (width x height)", 413
                ) from exc
            if isinstance(cause, UnidentifiedImageError):
                raise ServiceError(
                    "the uploaded file is not an image this service reads (JPEG, PNG or WebP)", 415
                ) from exc
            raise ServiceError(f"the uploaded image is corrupt or truncated ({cause})", 400) from exc


def item_view(image_id: str, metadata: dict[str, Any], score: float | None = None, rank: int | None = None) -> dict:
    """An item as the API shows it; ``metadata`` comes from the same index version as the id."""
    view: dict[str, Any] = {"id": image_id, "metadata": metadata, "image_url": f"/images/{quote(image_id, safe='')}"}
    if score is not None:
        view.update(rank=rank, score=round(score, 5))
    return view


def _catalog_text(metadata: dict[str, Any]) -> str:
    return " ".join(str(v) for v in metadata.values()).lower()


def _known(current: CatalogStore, item_id: str | None) -> str:
    """``item_id`` when it is in ``current``; ids outside the id grammar never reach the store."""
    problem = id_problem(item_id)
    if problem or item_id not in current:
        raise ServiceError(f"unknown item id {item_id!r}" + (f" ({problem})" if problem else ""), 404)
    return str(item_id)
