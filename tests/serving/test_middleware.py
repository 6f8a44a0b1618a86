"""The app's ASGI middlewares called directly, message by message: the body limit at its exact
boundary (by Content-Length before any byte is read, and by counting a chunked body), anything
that is not HTTP passed through untouched, and a 500 only while no response has started."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from fashion_cir.serving.app import BodyLimit, InternalErrors, SecurityHeaders
from fashion_cir.serving.service import MB

UPLOAD_LIMIT = 1 * MB
ROOM = 64 * 1024  # what the limit allows beyond the upload for the form's other fields


class Recorder:
    """An inner ASGI app that reads the whole body, then answers 200 with the bytes it read."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.body = b""

    async def __call__(self, scope, receive, send):
        self.calls.append((scope, receive, send))
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(self.body)).encode()})


def http_scope(headers: list[tuple[bytes, bytes]] = ()) -> dict:
    return {"type": "http", "method": "POST", "path": "/search", "headers": list(headers)}


def call(app, scope: dict, chunks: list[bytes]) -> tuple[list[dict], int]:
    """Run ``app`` on a request whose body arrives in ``chunks``; the messages sent back, and how
    many times the body was read."""
    sent: list[dict] = []
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        body = chunks[reads - 1] if reads <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": reads < len(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, reads


def status_and_detail(sent: list[dict]) -> tuple[int, str]:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], body.decode()


@pytest.mark.parametrize("middleware", [BodyLimit, SecurityHeaders, InternalErrors])
def test_what_is_not_http_passes_through_untouched(middleware):
    inner = Recorder()
    app = middleware(inner, UPLOAD_LIMIT) if middleware is BodyLimit else middleware(inner)
    scope = {"type": "lifespan"}

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        pass

    asyncio.run(app(scope, receive, send))
    assert inner.calls == [(scope, receive, send)]


def test_a_declared_length_one_byte_over_the_limit_is_refused_before_the_body_is_read():
    inner = Recorder()
    limited = BodyLimit(inner, UPLOAD_LIMIT)
    assert limited.limit == UPLOAD_LIMIT + ROOM
    at_limit = str(UPLOAD_LIMIT + ROOM).encode()
    sent, reads = call(limited, http_scope([(b"content-length", at_limit)]), [b"x" * (UPLOAD_LIMIT + ROOM)])
    assert status_and_detail(sent) == (200, str(UPLOAD_LIMIT + ROOM)) and reads == 1
    inner = Recorder()
    over = str(UPLOAD_LIMIT + ROOM + 1).encode()
    sent, reads = call(BodyLimit(inner, UPLOAD_LIMIT), http_scope([(b"content-length", over)]), [b"x"])
    status, body = status_and_detail(sent)
    assert (status, reads, inner.calls) == (413, 0, [])
    assert json.loads(body) == {"detail": "request is too large: uploads are limited to 1 MB"}


def test_a_chunked_body_is_counted_to_the_exact_byte():
    chunks = [b"x" * ROOM, b"y" * UPLOAD_LIMIT]  # no Content-Length: the middleware counts
    inner = Recorder()
    sent, _ = call(BodyLimit(inner, UPLOAD_LIMIT), http_scope(), chunks)
    assert status_and_detail(sent) == (200, str(UPLOAD_LIMIT + ROOM))
    inner = Recorder()
    sent, _ = call(BodyLimit(inner, UPLOAD_LIMIT), http_scope(), [*chunks, b"z"])
    status, body = status_and_detail(sent)  # the app's own answer to the cut body is not sent
    assert status == 413 and "uploads are limited to 1 MB" in body
    assert len(inner.body) == UPLOAD_LIMIT + ROOM  # it read up to the byte that went over


def test_an_error_before_the_response_is_a_500_and_after_it_is_the_servers(caplog):
    async def fails_first(scope, receive, send):
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="fashion_cir.serving.app"):
        sent, _ = call(InternalErrors(fails_first), http_scope(), [b""])
    [record] = caplog.records  # logged once, with the exception
    assert record.getMessage() == "POST /search failed" and str(record.exc_info[1]) == "boom"
    status, body = status_and_detail(sent)
    assert status == 500 and json.loads(body)["detail"].startswith("internal error (RuntimeError)")
    assert (b"connection", b"close") in sent[0]["headers"]

    async def fails_midway(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("cut short")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    with pytest.raises(RuntimeError, match="cut short"):  # only the server can end a started response
        asyncio.run(InternalErrors(fails_midway)(http_scope(), receive, send))
    assert [m["type"] for m in sent] == ["http.response.start"]
