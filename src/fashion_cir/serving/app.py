"""HTTP search service over a catalog index: ``POST /search``, item metadata and images, health,
OpenAPI docs at ``/docs`` and the web page at ``/``. Every error is JSON ``{"detail": "..."}``, an
unexpected one too (500, logged once, answered with ``Connection: close``). Uploads are decoded at
reduced size within a pixel limit sized to the model's input and an aspect ratio of at most 8:1,
and at most a few decode and encode at once (503 + Retry-After beyond that); ``/images`` serves
only image files inside the index's catalog root. Every answer carries nosniff, no-framing and
content-security-policy headers; a request is answered from one version of the index."""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

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
from ..retrieval.filters import FilterError
from ..retrieval.folder import LiveIndex, index_model
from ..retrieval.query import RequestError, SearchRequest
from ..retrieval.store import CatalogStore
from .limits import Busy, ConcurrencyLimit

try:
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import MutableHeaders
except ImportError as exc:  # pragma: no cover - depends on the install
    raise FashionCIRError("serving needs FastAPI and uvicorn: pip install 'fashion-cir[serve]'") from exc

STATIC = Path(__file__).parent / "static"
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_POLICY = "frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")
SEARCH_FIELDS = ("text", "k", "offset", "id", "image", "filter", "same_type", "similar")  # one value each
_SERVER_PATH = re.compile(r"(?<![\w.~<>-])/[^\s'\"/:,;()]+(?:/[^\s'\"/:,;()]+)*/?")
MB = 1 << 20
log = logging.getLogger(__name__)


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class HTTPMiddleware:
    """An ASGI middleware that handles HTTP requests (:meth:`http`) and passes anything else through."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        raise NotImplementedError


class BodyLimit(HTTPMiddleware):
    """Answer 413 to request bodies over the upload limit (plus room for form
    fields), by Content-Length up front and by counting bytes for chunked uploads."""

    def __init__(self, app: Callable, upload_limit: int):
        super().__init__(app)
        self.upload_limit = upload_limit
        self.limit = upload_limit + 64 * 1024

    def _message(self) -> str:
        return f"request is too large: uploads are limited to {self.upload_limit / MB:g} MB"

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _json_error(413, self._message())(scope, receive, send)
            return
        received = 0
        exceeded = False

        async def limited_receive() -> dict:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            if not exceeded:  # the app's own error for the aborted body is replaced by the 413
                await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded:
            await _json_error(413, self._message())(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class SecurityHeaders(HTTPMiddleware):
    """Every response says ``nosniff`` and may not be framed; all but the API docs (Swagger UI and
    ReDoc come from a CDN) get a content security policy that allows only this site's scripts, styles
    and images, plus ``blob:`` images for upload previews."""

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        policy = DOCS_POLICY if scope["path"].startswith(DOCS_PATHS) else PAGE_POLICY

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Content-Security-Policy"] = policy
            await send(message)

        await self.app(scope, receive, with_headers)


class InternalErrors(HTTPMiddleware):
    """An unexpected exception becomes a logged JSON 500 that says ``Connection: close`` and closes the
    connection. Left to the server, the exception reset the keep-alive connection without saying so,
    and the client's next request on it failed."""

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:  # a response cut short: only the server can end it (by closing the connection)
                raise
            log.error("%s %s failed", scope["method"], scope["path"], exc_info=exc)
            response = _json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def _decode_upload(raw: bytes, max_pixels: int, target_size: int) -> Image.Image:
    """Decode an uploaded reference image or raise the HTTP error that says what is wrong with it;
    the pixel limit and the aspect ratio are checked from the header, before the pixels are decoded."""
    try:
        return open_image(
            raw, max_pixels=max_pixels, name="uploaded image", target_size=target_size, max_aspect=MAX_ASPECT
        )
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except ImageTooThin as exc:
        raise HTTPException(422, str(exc)) from exc
    except DataError as exc:
        cause = exc.__cause__
        if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise HTTPException(
                413, f"uploaded image has too many pixels: the limit is {max_pixels:,} pixels (width x height)"
            ) from exc
        if isinstance(cause, UnidentifiedImageError):
            raise HTTPException(
                415, "the uploaded file is not an image this service reads (JPEG, PNG or WebP)"
            ) from exc
        raise HTTPException(400, f"the uploaded image is corrupt or truncated ({cause})") from exc


def create_app(
    index_folder: str | Path,
    model: CIRModel | str | Path | None = None,
    *,
    max_upload_bytes: int = 10 * MB,
    max_pixels: int | None = None,
    max_k: int = 100,
    max_text_chars: int = 300,
    exclude_reference: bool = True,
    upload_workers: int = 2,
    upload_queue: int = 16,
    search_timeout_s: float = 15.0,
    sample_seed: int | None = None,
) -> FastAPI:
    """The app for ``index_folder``. ``model``: a CIRModel, a model folder, a backbone spec, or
    None for the zero-shot backbone the index records; its image fingerprint must match the index.
    ``exclude_reference`` leaves a catalog reference out of its own results (the UI default).
    The index is followed live: ``fashion-cir index add/upsert/remove`` show up without a restart.
    ``max_pixels`` (default: 16x the model's input on each side) bounds the pixels an upload
    decodes to; ``upload_workers`` uploads decode and encode at once, ``upload_queue`` more wait
    (holding only their raw bytes), and further uploads get 503 + Retry-After.
    ``search_timeout_s`` is how long the page waits for a search before offering a retry.
    ``sample_seed`` fixes the page's catalog sample (a ``?seed=N`` in the page's address wins;
    None: a random sample on each visit)."""
    cir = index_model(index_folder, model)
    index = LiveIndex(index_folder, cir)
    input_size = cir.backbone.image_size
    max_pixels = max_pixels or upload_pixel_limit(input_size)
    uploads = ConcurrencyLimit(upload_workers, upload_queue)
    app = FastAPI(
        title="fashion-cir search",
        version="1",
        description="Composed image retrieval: a reference image (upload or catalog id) plus a "
        "relative caption such as 'is red with long sleeves' -> ranked catalog items.",
    )
    app.add_middleware(BodyLimit, upload_limit=max_upload_bytes)
    app.add_middleware(InternalErrors)  # outside BodyLimit, whose own exception ends inside it
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, 413s and 500s included
    app.state.index, app.state.model = index, cir

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
            parts.append(
                f"{where}: {error.get('msg', 'invalid value')}" if where else error.get("msg", "invalid value")
            )
        return _json_error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(FashionCIRError)
    async def input_error(request: Request, exc: FashionCIRError) -> JSONResponse:
        return _json_error(400, public(str(exc)))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _json_error(exc.status, public(str(exc)))

    @app.exception_handler(FilterError)
    async def filter_error(request: Request, exc: FilterError) -> JSONResponse:
        return _json_error(422, str(exc))

    def public(message: str) -> str:
        """``message`` without server paths: the index folder reads ``<index>``, any other ``<path>``."""
        for folder in sorted({str(index.folder), str(index.folder.resolve())}, key=len, reverse=True):
            message = message.replace(folder, "<index>")
        return _SERVER_PATH.sub("<path>", message)

    def item_view(
        image_id: str, metadata: dict[str, Any], score: float | None = None, rank: int | None = None
    ) -> dict[str, Any]:
        """An item as the API shows it; ``metadata`` comes from the same index version as the id."""
        view: dict[str, Any] = {
            "id": image_id,
            "metadata": metadata,
            "image_url": f"/images/{quote(image_id, safe='')}",
        }
        if score is not None:
            view.update(rank=rank, score=round(score, 5))
        return view

    def catalog_text(metadata: dict[str, Any]) -> str:
        return " ".join(str(v) for v in metadata.values()).lower()

    def known(current: CatalogStore, item_id: str) -> str:
        """``item_id`` when it is in ``current``; ids outside the id grammar never reach the store."""
        problem = id_problem(item_id)
        if problem or item_id not in current:
            raise HTTPException(404, f"unknown item id {item_id!r}" + (f" ({problem})" if problem else ""))
        return item_id

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", summary="Service and index status")
    def health() -> dict[str, Any]:
        current, problem = index.current(), index.problem  # (read once: another request may change it)
        state = {"status": "degraded", "problem": public(problem)} if problem else {"status": "ok"}
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
            "query_mode": cir.query_mode,
            "attribute_heads": cir.attribute_heads is not None,
            "page": {"search_timeout_ms": int(search_timeout_s * 1000), "sample_seed": sample_seed},
            "limits": {
                "max_upload_bytes": max_upload_bytes,
                "max_pixels": max_pixels,
                "max_k": max_k,
                "max_text_chars": max_text_chars,
            },
        }

    @app.get("/items", summary="Browse the catalog: a random sample, optionally filtered by words (any order)")
    def items(
        n: int = Query(24, ge=1, le=200), seed: int = Query(0), q: str = Query("", max_length=100)
    ) -> dict[str, Any]:
        records = list(index.current().metadata.items())  # one read of the store, whatever the catalog size
        words = q.lower().split()
        matched = [(i, m) for i, m in records if all(word in catalog_text(m) for word in words)]
        chosen = random.Random(seed).sample(matched, min(n, len(matched)))
        return {"total": len(records), "matched": len(matched), "items": [item_view(i, m) for i, m in chosen]}

    @app.get("/items/{item_id:path}", summary="Metadata of one catalog item")
    def item(item_id: str) -> dict[str, Any]:
        current = index.current()
        return item_view(known(current, item_id), current.metadata.get(item_id, {}))

    @app.get("/images/{item_id:path}", summary="The image of one catalog item", response_class=FileResponse)
    def image(item_id: str) -> FileResponse:
        current = index.current()
        path = Path(current.paths[known(current, item_id)])
        root = os.path.normpath(current.config.get("root") or "/nonexistent")
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not os.path.normpath(path).startswith(
            root.rstrip(os.sep) + os.sep
        ):
            raise HTTPException(404, f"item {item_id!r} has no image file inside the catalog")
        if not path.is_file():
            raise HTTPException(404, f"the image file of item {item_id!r} is missing on the server")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    async def given_once(request: Request) -> None:
        """Refuse a search field given more than once (the form would keep the last, silently),
        except the repeatable category and color."""
        form = await request.form()
        for name in SEARCH_FIELDS:
            times = len(form.getlist(name))
            if times > 1:
                raise HTTPException(422, f"field {name!r} is given {times} times; give it once")

    @app.post(
        "/search",
        summary="Composed search: reference image (upload or catalog id) + relative caption",
        dependencies=[Depends(given_once)],
    )
    def search_endpoint(
        text: str = Form("", max_length=max_text_chars, description="the change, e.g. 'is red with long sleeves'"),
        k: int = Form(10, ge=1, le=max_k, description="number of results"),
        offset: int = Form(0, ge=0, le=10_000, description="results to skip (load more)"),
        id: str | None = Form(None, description="a catalog item id as the reference"),
        image: UploadFile | None = File(None, description=f"a reference image (at most {max_upload_bytes // MB} MB)"),
        filter: str = Form(
            "", max_length=2000, description='metadata filter, e.g. category == "dress" and color != "black"'
        ),
        category: list[str] = Form([], description="keep only these categories (repeatable)"),
        color: list[str] = Form([], description="keep only these colours (repeatable)"),
        same_type: bool = Form(False, description="keep only the reference's category (predicted for an upload)"),
        similar: bool = Form(False, description="more like this: the reference image alone, no text"),
    ) -> dict[str, Any]:
        has_upload = image is not None and bool(image.filename or image.size)
        request = SearchRequest(
            text=text,
            k=k,
            offset=offset,
            item_id=id or None,
            image=has_upload,
            filter=filter,
            category=category,
            color=color,
            same_type=same_type,
            similar=similar,
            exclude_reference=exclude_reference,
            reference_required=True,
            text_required=True,
            max_text_chars=max_text_chars,
        )
        current = index.current()
        parsed = request.parsed_filter(current.fields)
        reference = None
        if has_upload:
            raw = image.file.read(max_upload_bytes + 1)
            if len(raw) > max_upload_bytes:
                raise HTTPException(413, f"uploaded image is larger than the limit of {max_upload_bytes / MB:.1f} MB")
            if not raw:
                raise HTTPException(400, "uploaded image is empty")
        else:
            known(current, request.item_id)
        start = time.perf_counter()
        try:
            with uploads.slot() if has_upload else contextlib.nullcontext():
                if has_upload:
                    reference = _decode_upload(raw, max_pixels, input_size)
                result = request.run(cir, current, reference, parsed)
        except Busy:
            raise HTTPException(
                503,
                f"too many uploads are being processed ({uploads.workers} at once, "
                f"{uploads.queue} waiting); retry in a moment",
                headers={"Retry-After": "1"},
            ) from None
        took = round((time.perf_counter() - start) * 1000, 2)
        requested = requested_changes(result.query_text and request.text)
        reference_values = attribute_values(result.reference_attributes)
        results = []
        for rank, hit in enumerate(result.hits, offset + 1):
            view = item_view(hit.id, hit.metadata, hit.score, rank)  # not the live index's: it may have changed
            view["match"] = explain(requested, reference_values, hit.metadata)
            results.append(view)
        if has_upload:
            reference_view: dict[str, Any] = {"id": None, "upload": image.filename}
        else:
            reference_view = item_view(request.item_id, current.metadata.get(request.item_id, {}))
        return {
            "reference": reference_view,
            "reference_attributes": result.reference_attributes,
            "prompt": {"source": result.prompt_source, "description": result.description},
            "text": request.query_text,
            "query_text": result.query_text,
            "requested": {name: phrase(name, value) for name, value in requested.items()},
            "filter": filter.strip() or None,
            "filters": result.filters,
            "k": k,
            "offset": offset,
            "more": result.more,
            "took_ms": took,
            "results": results,
        }

    return app


def serve(
    index_folder: str | Path,
    model: CIRModel | str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **app_options: Any,
) -> None:
    """Run the app with uvicorn until interrupted (``app_options`` go to :func:`create_app`)."""
    import uvicorn

    uvicorn.run(create_app(index_folder, model, **app_options), host=host, port=port, log_level="info")
