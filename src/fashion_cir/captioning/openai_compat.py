"""Backend for any OpenAI-compatible chat-completions endpoint with image input (OpenAI, vLLM,
llama.cpp server, Ollama, LM Studio, ...): images go as base64 data URLs, requests run in a bounded
thread pool, timeouts / 429 / 5xx / non-JSON bodies are retried with exponential backoff. Several
base URLs (a vLLM fleet) share the requests: each goes to the least busy endpoint that is not
backing off, and an endpoint that fails transiently backs off on its own (exponentially, reset by
a success) while the others carry on. Secrets are never stored: credentials in a base URL are
sent as HTTP basic auth and left out of every message, and error bodies kept in failure records
are scrubbed of the key and of anything that looks like a token."""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from ..data.images import open_image
from ..errors import DataError, ModelError
from .base import Captioner, CaptionRequest, RequestFailed
from .vocab import DEFAULT_VOCABULARY, Vocabulary

log = logging.getLogger(__name__)
# API keys (sk-..., key_...) and bearer / basic credentials, wherever a server echoes them
TOKEN = re.compile(
    r"\b(?:sk|pk|rk|key|tok|token|api[-_]?key)[-_][A-Za-z0-9_\-]{8,}|\b(?:bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}",
    re.IGNORECASE,
)


def split_credentials(base_url: str) -> tuple[str, str, tuple[str, str] | None]:
    """``base_url`` as (root without ``user:password@`` or query, query, those credentials)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(
            f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {redact_url(base_url)!r}"
        )
    credentials = (
        (unquote(parts.username or ""), unquote(parts.password or "")) if parts.username or parts.password else None
    )
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), parts.query, credentials


def redact_url(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url.split("?", 1)[0])


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every known secret and anything shaped like an API key or bearer token masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return TOKEN.sub("***", text)


class Endpoints:
    """Request routing over several base URLs with per-endpoint backoff."""

    def __init__(self, urls: Sequence[str], backoff_s: float, max_backoff_s: float = 30.0):
        self.urls = list(urls)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.busy = [0] * len(self.urls)
        self.failures = [0] * len(self.urls)
        self.ready_at = [0.0] * len(self.urls)
        self.sent = [0] * len(self.urls)
        self._lock = threading.Lock()

    def acquire(self) -> int:
        """The least busy endpoint that is not backing off (waits while all are)."""
        while True:
            with self._lock:
                now = time.monotonic()
                ready = [i for i, at in enumerate(self.ready_at) if at <= now]
                if ready:
                    chosen = min(ready, key=lambda i: (self.busy[i], self.failures[i], self.sent[i]))
                    self.busy[chosen] += 1
                    self.sent[chosen] += 1
                    return chosen
                wait = min(self.ready_at) - now
            time.sleep(min(max(wait, 0.001), 1.0))

    def release(self, endpoint: int, transient_failure: bool) -> None:
        with self._lock:
            self.busy[endpoint] -= 1
            if transient_failure:
                self.failures[endpoint] += 1
                delay = min(self.backoff_s * 2 ** (self.failures[endpoint] - 1), self.max_backoff_s)
                self.ready_at[endpoint] = time.monotonic() + delay
            else:
                self.failures[endpoint] = 0


class OpenAICaptioner(Captioner):
    """Chat-completions client. The API key is read from the environment variable NAMED by
    ``api_key_env`` (the key itself is never stored in configs or logged); without it no
    Authorization header is sent (fine for local servers)."""

    thread_safe = True  # one HTTP client, shared by threads

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str] | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        vocab: Vocabulary = DEFAULT_VOCABULARY,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_tokens: int = 400,
        temperature: float = 0.0,
    ):
        super().__init__(vocab)
        if concurrency < 1 or max_retries < 0:
            raise ModelError("concurrency must be >= 1 and max_retries >= 0")
        self.model = model
        self.model_id = f"openai:{model}"
        self.batch_size = 4 * concurrency
        bases = [base_url] if isinstance(base_url, str) else list(base_url or [])
        if not bases:
            raise ModelError(
                "the openai backend needs --base-url, the server's API root: e.g. http://127.0.0.1:8000/v1 "
                "for a local server, https://api.openai.com/v1 for OpenAI (no endpoint is assumed)"
            )
        parsed = [split_credentials(base) for base in bases]
        self.urls = [
            root + "/chat/completions" for root, _, _ in parsed
        ]  # what messages show: no credentials, no query
        self._request_urls = {
            url: url + (f"?{query}" if query else "") for url, (_, query, _) in zip(self.urls, parsed)
        }
        self.url = self.urls[0]
        self.endpoints = Endpoints(self.urls, backoff_s)
        self.concurrency, self.max_retries, self.backoff_s = concurrency, max_retries, backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        self._secrets = tuple(s for s in (api_key, *(part for _, _, c in parsed for part in c or ())) if s)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            log.warning("environment variable %s is not set: sending requests without an API key", api_key_env)
        # credentials in a base URL go as basic auth to that endpoint (the API key, when set, wins)
        self._auth = {
            url: httpx.BasicAuth(*c) if c and not api_key else httpx.USE_CLIENT_DEFAULT
            for url, (_, _, c) in zip(self.urls, parsed)
        }
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s))

    def __repr__(self) -> str:
        return f"OpenAICaptioner(model={self.model!r}, urls={self.urls!r})"

    def complete(self, content: str | list[dict]) -> str:
        """One user message -> the assistant's text. Retries transient failures; raises RequestFailed."""
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        problem, url = "", self.url
        for _ in range(self.max_retries + 1):
            endpoint = self.endpoints.acquire()  # waits while every endpoint backs off
            url = self.urls[endpoint]
            try:
                answer, problem = self._post(url, payload)
            except RequestFailed:  # the request's own fault (4xx): the endpoint is fine
                self.endpoints.release(endpoint, transient_failure=False)
                raise
            self.endpoints.release(endpoint, transient_failure=answer is None)
            if answer is not None:
                return answer
        raise RequestFailed(f"{url}: {problem} after {self.max_retries + 1} attempts")

    def _post(self, url: str, payload: dict) -> tuple[str | None, str]:
        """(answer, "") or (None, what went wrong) for a transient failure; RequestFailed otherwise."""
        try:
            response = self._client.post(self._request_urls[url], json=payload, auth=self._auth[url])
        except httpx.TimeoutException:
            return None, "timed out"
        except httpx.TransportError as exc:
            return None, f"connection failed ({type(exc).__name__})"
        if response.status_code == 429 or response.status_code >= 500:
            return None, f"HTTP {response.status_code}"
        if response.status_code >= 400:
            raise RequestFailed(f"HTTP {response.status_code} from {url}: {self._scrub(response.text[:200])}")
        try:
            return response.json()["choices"][0]["message"]["content"] or "", ""
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"malformed response body: {self._scrub(response.text[:200])!r}"

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def complete_texts(self, prompts: list[str]) -> list[str | RequestFailed]:
        """Text-only completions, ``concurrency`` at a time (used to rewrite captions)."""
        return self._map(self.complete, prompts)

    def answer(self, requests: list[CaptionRequest]) -> list[str | RequestFailed]:
        return self._map(self._describe, requests)

    def _describe(self, request: CaptionRequest) -> str:
        try:
            open_image(request.path)  # reject unreadable images before uploading them
        except DataError as exc:
            raise RequestFailed(str(exc)) from exc
        mime = mimetypes.guess_type(request.path.name)[0] or "image/jpeg"
        data = base64.b64encode(request.path.read_bytes()).decode("ascii")
        return self.complete(
            [
                {"type": "text", "text": self.prompt(request)},
                {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
            ]
        )

    def _map(self, function, items: list) -> list:
        def guarded(item):
            try:
                return function(item)
            except RequestFailed as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(guarded, items))
