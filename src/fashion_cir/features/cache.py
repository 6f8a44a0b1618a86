"""A content-keyed, resumable on-disk cache of image features.

Layout: ``ROOT/<trunk fingerprint>/part-NNNNN.npz`` (ids, image sha1s, fp16 trunk features) plus
``meta.json``. The cache stores the backbone's expensive image trunk and applies its cheap head
(a projection, if any) on the way out, so retraining a projection reuses the cached trunk. The
fingerprint hashes the trunk's weights and the preprocessing, so a changed model or transform
never reuses stale features; the per-image sha1 catches edited files.
Shards are written atomically every ``flush_every`` images under names unique to the writer
(``part-<time>-<pid>-<random>.npz``), so an interrupted run resumes where it stopped, and several
processes filling one cache (``fashion-cir features encode --shard I/N``) never overwrite each other.
A shard that cannot be parsed is moved aside (``*.corrupt``) and its images recomputed; any other
read error is raised."""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import open_image
from ..errors import DataError
from ..io import atomic_write_bytes, environment_info, file_sha1, write_json
from ..models.backbone import Backbone
from ..progress import Progress

log = logging.getLogger(__name__)


class _ImageDataset(Dataset):
    """Decodes and preprocesses images; returns the error text instead of raising, so the main
    process can report the file without a worker traceback."""

    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(open_image(self.paths[index])), ""
        except DataError as exc:
            return index, None, str(exc)


def _collate(batch):
    indices = [b[0] for b in batch]
    errors = [(b[0], b[2]) for b in batch if b[2]]
    tensors = [b[1] for b in batch if not b[2]]
    good = [b[0] for b in batch if not b[2]]
    return indices, good, (torch.stack(tensors) if tensors else None), errors


def _prefetched(dataset: _ImageDataset, batch_size: int) -> Iterator[tuple]:
    """Collated batches, each decoded in a thread while the previous one is encoded (decoding
    releases the GIL), so decoding and the forward pass share the two cores."""
    starts = range(0, len(dataset), batch_size)

    def load(start: int) -> tuple:
        return _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])

    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0])
        for following in starts[1:]:
            batch = pending.result()
            pending = pool.submit(load, following)
            yield batch
        yield pending.result()


@dataclass
class CacheStats:
    requested: int = 0
    reused: int = 0
    computed: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # id -> why it could not be encoded


class FeatureCache:
    def __init__(self, root: str | Path, flush_every: int = 512):
        self.root = Path(root)
        self.flush_every = flush_every
        self.last_stats = CacheStats()

    def folder(self, backbone: Backbone) -> Path:
        return self.root / backbone.trunk_fingerprint()

    def _load_existing(self, folder: Path) -> dict[tuple[str, str], np.ndarray]:
        stored: dict[tuple[str, str], np.ndarray] = {}
        for shard in sorted(folder.glob("part-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    entries = list(zip(data["ids"], data["sha1"], data["features"]))
            except FileNotFoundError:  # another process moved it aside meanwhile
                continue
            except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError) as exc:
                # torn or garbled (e.g. copied half-way): keep it for inspection, recompute its images
                aside = shard.with_name(f"{shard.name}.{os.getpid()}.corrupt")
                shard.replace(aside)
                log.warning(
                    "feature cache shard %s is corrupt (%s): moved to %s; its images are recomputed",
                    shard,
                    exc,
                    aside.name,
                )
                continue
            except OSError as exc:
                raise DataError(f"cannot read feature cache shard {shard}: {exc.strerror or exc}") from exc
            for image_id, sha, feature in entries:
                stored[(str(image_id), str(sha))] = feature
        return stored

    def _write_shard(self, folder: Path, ids: list[str], shas: list[str], features: list[np.ndarray]) -> None:
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.array(ids), sha1=np.array(shas), features=np.stack(features).astype(np.float16))
        atomic_write_bytes(folder / name, buffer.getvalue())

    @torch.no_grad()
    def encode(
        self,
        backbone: Backbone,
        image_paths: dict[str, Path],
        batch_size: int = 64,
        num_workers: int = 0,
        on_error: str = "raise",
        progress: bool = True,
        device: str | torch.device | None = None,
        head: bool = True,
    ) -> tuple[list[str], np.ndarray]:
        """Features for ``image_paths`` (id -> file), in the dict's order, as float32 [N, d].
        ``on_error='skip'`` leaves unreadable images out (counted in ``last_stats.failed``);
        ``head=False`` returns the cached trunk features as they are (to train the head on)."""
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        folder = self.folder(backbone)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "meta.json").exists():
            write_json(
                folder / "meta.json",
                {
                    "backbone": backbone.spec,
                    "preprocess": backbone.preprocess_description,
                    "feature_dim": backbone.feature_dim,
                    "versions": environment_info(),
                },
            )
        ids = list(image_paths)
        missing = [i for i in ids if not Path(image_paths[i]).is_file()]
        if missing and on_error == "raise":
            raise DataError(f"{len(missing)} image files not found, first: {image_paths[missing[0]]}")
        not_found = {i: f"image not found: {image_paths[i]}" for i in missing}
        shas = {i: file_sha1(image_paths[i]) for i in ids if i not in missing}
        stored = self._load_existing(folder)
        todo = [i for i in shas if (i, shas[i]) not in stored]
        stats = CacheStats(requested=len(ids), reused=len(shas) - len(todo), failed=len(missing), errors=not_found)
        start = time.perf_counter()
        if todo:
            device = torch.device(device) if device is not None else backbone.device
            was_training = backbone.training
            backbone.eval()
            dataset = _ImageDataset([Path(image_paths[i]) for i in todo], backbone.preprocess)
            loader = (
                DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
                if num_workers
                else _prefetched(dataset, batch_size)
            )
            engine = backbone.trunk_engine()
            pending: tuple[list, list, list] = ([], [], [])
            bar = Progress(len(todo), "encoding images", "img", enabled=progress)
            try:
                for _, good, pixels, errors in loader:
                    for index, message in errors:
                        if on_error == "raise":
                            raise DataError(message)
                        stats.failed += 1
                        stats.errors[todo[index]] = message
                    if pixels is not None:
                        features = engine(pixels.to(device)).float().cpu().numpy()
                        for index, feature in zip(good, features):
                            image_id = todo[index]
                            pending[0].append(image_id)
                            pending[1].append(shas[image_id])
                            pending[2].append(feature)
                            stored[(image_id, shas[image_id])] = feature.astype(np.float16)
                        stats.computed += len(good)
                    if len(pending[0]) >= self.flush_every:
                        self._write_shard(folder, *pending)
                        pending = ([], [], [])
                    bar.update(len(good) + len(errors))
            finally:  # keep what was computed, also on Ctrl-C or a bad image, so a re-run resumes
                if pending[0]:
                    self._write_shard(folder, *pending)
                bar.close()
                backbone.train(was_training)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        kept = [i for i in ids if i in shas and (i, shas[i]) in stored]
        if not kept:
            return [], np.zeros((0, backbone.feature_dim), dtype=np.float32)
        trunk = torch.from_numpy(np.stack([stored[(i, shas[i])] for i in kept]).astype(np.float32))
        if not head:
            return kept, trunk.numpy()
        head_param = next(iter(backbone.parameters()))
        with torch.no_grad():
            features = backbone.image_head(trunk.to(head_param.device, head_param.dtype)).float().cpu().numpy()
        return kept, features
