"""``run_captioning``: caption a catalog with any backend, resumably, never crashing on one image."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..io import file_sha1, write_json
from ..progress import Progress
from .base import Captioner, CaptionRequest, RequestFailed
from .cache import DONE_STATUSES, CaptionCache
from .parse import parse_answer
from .schema import Attributes, InvalidAnswer, validate_attributes

log = logging.getLogger(__name__)


def _attempt_all(captioner: Captioner, pending: list[CaptionRequest], max_attempts: int) -> dict[str, dict]:
    """Ask for every request, re-asking invalid answers with the reason as feedback, up to
    ``max_attempts`` times. Returns ``image_id -> partial record`` (status, attributes, raw, error, attempts)."""
    results: dict[str, dict] = {}
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
        answers = captioner.answer(pending)
        retry = []
        for request, answer in zip(pending, answers, strict=True):
            if isinstance(answer, RequestFailed):
                results[request.image_id] = {
                    "status": "error",
                    "attributes": None,
                    "raw": None,
                    "error": str(answer),
                    "attempts": attempt,
                }
                continue
            try:
                attributes = parse_answer(answer, captioner.vocab)
            except InvalidAnswer as exc:
                results[request.image_id] = {
                    "status": "invalid",
                    "attributes": None,
                    "raw": answer,
                    "error": str(exc),
                    "attempts": attempt,
                }
                retry.append(CaptionRequest(request.image_id, request.path, feedback=str(exc)[:300]))
                continue
            results[request.image_id] = {
                "status": "ok",
                "attributes": attributes.to_record(request.image_id),
                "raw": answer,
                "error": None,
                "attempts": attempt,
            }
        pending = retry
    return results


def caption_one(captioner: Captioner, image_id: str, path: Path, max_attempts: int = 2) -> dict:
    """One image asked as a catalog run asks (an invalid answer is asked again with the reason):
    ``status`` ok (with ``attributes``, the attributes.jsonl record), invalid or error (with ``error``)."""
    return _attempt_all(captioner, [CaptionRequest(image_id, path)], max_attempts)[image_id]


def summary_path(cache_dir: str | Path, captioner: Captioner, shard: tuple[int, int] = (0, 1)) -> Path:
    """Where :func:`run_captioning` writes its summary (counts, and every failure with its reason)."""
    return CaptionCache(cache_dir, captioner.model_id, captioner.prompt_version, shard).path.with_suffix(
        ".summary.json"
    )


def run_captioning(
    image_paths: dict[str, Path],
    captioner: Captioner,
    cache_dir: str | Path,
    max_attempts: int = 3,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Attributes]:
    """Caption every image (id -> path) and return id -> ``Attributes`` for the valid answers.

    Results are appended to a JSONL cache in ``cache_dir`` after every batch, so a killed run resumes
    where it stopped; images with identical content are captioned once. Unreadable images, request
    failures and answers still invalid after ``max_attempts`` are recorded (with the raw answer) and
    left out of the result. A summary (counts, failures, images/s) is written to ``<cache>.summary.json``.
    ``shard`` (I, N) names this writer's cache file when several processes share the cache."""
    cache = CaptionCache(cache_dir, captioner.model_id, captioner.prompt_version, shard)
    keys: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for image_id, path in image_paths.items():
        try:
            keys[image_id] = cache.key(file_sha1(path))
        except OSError as exc:
            unreadable[image_id] = f"{path}: {exc.strerror or exc}"
    records = cache.load()
    todo: dict[str, str] = {}  # key -> first image id with that content
    for image_id, key in keys.items():
        if key not in todo and records.get(key, {}).get("status") not in DONE_STATUSES:
            todo[key] = image_id
    started, reused = time.perf_counter(), len(set(keys.values())) - len(todo)
    queue = list(todo.items())
    with Progress(len(queue), f"captioning ({captioner.model_id})", "img", enabled=progress) as bar:
        for start in range(0, len(queue), captioner.batch_size):
            chunk = queue[start : start + captioner.batch_size]
            requests = [CaptionRequest(image_id, Path(image_paths[image_id])) for _, image_id in chunk]
            results = _attempt_all(captioner, requests, max_attempts)
            new = []
            for key, image_id in chunk:
                record = {
                    "key": key,
                    "image": image_id,
                    "model": captioner.model_id,
                    "prompt_version": captioner.prompt_version,
                    **results[image_id],
                }
                new.append(record)
                records[key] = record
            cache.append(new)
            bar.update(len(chunk))
    elapsed = time.perf_counter() - started
    attributes: dict[str, Attributes] = {}
    failures: dict[str, dict] = {i: {"status": "unreadable", "error": e} for i, e in unreadable.items()}
    for image_id, key in keys.items():
        record = records[key]
        if record["status"] == "ok":
            attributes[image_id] = validate_attributes(record["attributes"], captioner.vocab)
        else:
            failures[image_id] = {k: record[k] for k in ("status", "error", "raw")}
    summary = {
        "model": captioner.model_id,
        "prompt_version": captioner.prompt_version,
        "images": len(image_paths),
        "ok": len(attributes),
        "failed": len(failures),
        "captioned_now": len(queue),
        "reused_from_cache": reused,
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(queue) / elapsed, 3) if elapsed > 0 else None,
        "failures": failures,
    }
    write_json(summary_path(cache_dir, captioner, shard), summary)
    log.info(
        "captioned %d images (%d from cache): %d ok, %d failed",
        len(image_paths),
        reused,
        len(attributes),
        len(failures),
    )
    return attributes
