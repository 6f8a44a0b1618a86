"""Backend for any OpenAI-compatible chat-completions endpoint with image input (OpenAI, vLLM,
llama.cpp server, Ollama, LM Studio, ...): images go as base64 data URLs, requests run in a bounded
thread pool, timeouts / 429 / 5xx / non-JSON bodies are retried with exponential backoff."""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..data.images import open_image
from ..errors import DataError, ModelError
from .base import Captioner, CaptionRequest, RequestFailed
from .vocab import DEFAULT_VOCABULARY, Vocabulary

log = logging.getLogger(__name__)


class OpenAICaptioner(Captioner):
    """Chat-completions client. The API key is read from the environment variable NAMED by
    ``api_key_env`` (the key itself is never stored in configs or logged); without it no
    Authorization header is sent (fine for local servers)."""

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
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
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.concurrency, self.max_retries, self.backoff_s = concurrency, max_retries, backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            log.warning("environment variable %s is not set: sending requests without an API key", api_key_env)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s))

    def __repr__(self) -> str:
        return f"OpenAICaptioner(model={self.model!r}, url={self.url!r})"

    def complete(self, content: str | list[dict]) -> str:
        """One user message -> the assistant's text. Retries transient failures; raises RequestFailed."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": self.max_tokens, "temperature": self.temperature}
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                problem = "timed out"
                continue
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise RequestFailed(f"HTTP {response.status_code} from {self.url}: {response.text[:200]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"malformed response body: {response.text[:200]!r}"
        raise RequestFailed(f"{self.url}: {problem} after {self.max_retries + 1} attempts")

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
        return self.complete([
            {"type": "text", "text": self.prompt(request)},
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
        ])

    def _map(self, function, items: list) -> list:
        def guarded(item):
            try:
                return function(item)
            except RequestFailed as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(guarded, items))
