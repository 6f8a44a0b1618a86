"""The HTTP face of :class:`~fashion_cir.serving.service.SearchService`: ``POST /search``, item
metadata and images, health, OpenAPI docs at ``/docs`` and the web page at ``/``. The routes parse
HTTP, call the service and map its errors to statuses. Every error is JSON ``{"detail": "..."}``,
an unexpected one too (500, logged once, answered with ``Connection: close``); bodies over the
upload limit are 413; every answer carries nosniff, no-framing and content-security-policy headers."""

from __future__ import annotations

import contextlib
import logging
import mimetypes
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..captioning.base import Captioner
from ..errors import FashionCIRError
from ..models.cir import CIRModel
from ..retrieval.filters import FilterError
from ..retrieval.query import RequestError
from .service import MB, Limits, SearchService, ServiceError

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
    int8_queries: bool = False,
    upload_captioner: Captioner | None = None,
) -> FastAPI:
    """The app for ``index_folder``: the routes over a :class:`SearchService` (see
    :meth:`SearchService.open` for ``model``, and the service for the limits and
    ``exclude_reference``). The index is followed live: ``fashion-cir index add/upsert/remove``
    show up without a restart. ``search_timeout_s`` is how long the page waits for a search before
    offering a retry. ``sample_seed`` fixes the page's catalog sample (a ``?seed=N`` in the page's
    address wins; None: a random sample on each visit). ``int8_queries``, ``upload_captioner``: see
    the service."""
    limits = Limits(max_upload_bytes, max_pixels, max_k, max_text_chars)
    service = SearchService.open(
        index_folder,
        model,
        limits=limits,
        exclude_reference=exclude_reference,
        upload_workers=upload_workers,
        upload_queue=upload_queue,
        int8_queries=int8_queries,
        upload_captioner=upload_captioner,
    )
    return search_app(service, search_timeout_s, sample_seed)


def search_app(service: SearchService, search_timeout_s: float = 15.0, sample_seed: int | None = None) -> FastAPI:
    """The FastAPI app over ``service``: parses requests, calls the service, maps its errors."""
    limits = service.limits
    app = FastAPI(
        title="fashion-cir search",
        version="1",
        description="Composed image retrieval: a reference image (upload or catalog id) plus a "
        "relative caption such as 'is red with long sleeves' -> ranked catalog items.",
    )
    app.add_middleware(BodyLimit, upload_limit=limits.max_upload_bytes)
    app.add_middleware(InternalErrors)  # outside BodyLimit, whose own exception ends inside it
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, 413s and 500s included
    app.state.service, app.state.index, app.state.model = service, service.index, service.model

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
        return _json_error(400, service.public(str(exc)))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _json_error(exc.status, service.public(str(exc)))

    @app.exception_handler(FilterError)
    async def filter_error(request: Request, exc: FilterError) -> JSONResponse:
        return _json_error(422, str(exc))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        response = _json_error(exc.status, str(exc))
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", summary="Service and index status")
    def health() -> dict[str, Any]:
        return {
            **service.status(),
            "page": {"search_timeout_ms": int(search_timeout_s * 1000), "sample_seed": sample_seed},
            "limits": asdict(limits),
        }

    @app.get("/items", summary="Browse the catalog: a random sample, optionally filtered by words (any order)")
    def items(
        n: int = Query(24, ge=1, le=200), seed: int = Query(0), q: str = Query("", max_length=100)
    ) -> dict[str, Any]:
        return service.browse(n, seed, q)

    @app.get("/items/{item_id:path}", summary="Metadata of one catalog item")
    def item(item_id: str) -> dict[str, Any]:
        return service.item(item_id)

    @app.get("/images/{item_id:path}", summary="The image of one catalog item", response_class=FileResponse)
    def image(item_id: str) -> FileResponse:
        path = service.image_file(item_id)
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
        text: str = Form(
            "", max_length=limits.max_text_chars, description="the change, e.g. 'is red with long sleeves'"
        ),
        k: int = Form(10, ge=1, le=limits.max_k, description="number of results"),
        offset: int = Form(0, ge=0, le=10_000, description="results to skip (load more)"),
        id: str | None = Form(None, description="a catalog item id as the reference"),
        image: UploadFile | None = File(
            None, description=f"a reference image (at most {limits.max_upload_bytes // MB} MB)"
        ),
        filter: str = Form(
            "", max_length=2000, description='metadata filter, e.g. category == "dress" and color != "black"'
        ),
        category: list[str] = Form([], description="keep only these categories (repeatable)"),
        color: list[str] = Form([], description="keep only these colours (repeatable)"),
        same_type: bool = Form(
            False, description="keep only the reference's category (an upload's: the MLLM's or predicted)"
        ),
        similar: bool = Form(False, description="more like this: the reference image alone, no text"),
    ) -> dict[str, Any]:
        upload = image if image is not None and (image.filename or image.size) else None
        request = service.request(
            text=text,
            k=k,
            offset=offset,
            item_id=id or None,
            image=upload is not None,
            filter=filter,
            filters={"category": category, "color": color},
            same_type=same_type,
            similar=similar,
        )
        if upload is None:
            return service.search(request)
        return service.search(request, upload.file.read(limits.max_upload_bytes + 1), upload.filename)

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
