"""Frozen modules run by ONNX Runtime on the CPU: the same outputs as PyTorch's (within float
rounding, tested) in less time here: the image trunk (depthwise convolutions) and the description
matcher's sentence encoder (small batches of short texts, what a search sends). Each graph is
exported once per weights fingerprint into a cache folder and reused."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

ENV_SWITCH = "FASHION_CIR_ONNX"  # "0" keeps PyTorch


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-cir" / "onnx"


def onnxruntime_available() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_engine(graph: Path, spin: bool = True, int8: bool = False) -> Callable[..., torch.Tensor]:
    """The exported ``graph`` (:func:`export_graph`) run by ONNX Runtime with as many threads as
    torch uses: it takes the module's keyword tensors and returns its one tensor. ``spin=False``:
    its threads sleep between runs instead of spinning (a server doing other work between short
    runs). ``int8``: the graph's matrix products with int8 weights (dynamic quantization, one scale
    per output channel; :func:`int8_graph`): about 1.5x faster for a search's texts here, not the
    same features (BENCHMARKS.md, "int8 query encoder")."""
    import onnxruntime as ort

    path = int8_graph(graph) if int8 else graph
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(**inputs: torch.Tensor) -> torch.Tensor:
        feed = {key: value.detach().cpu().contiguous().numpy() for key, value in inputs.items()}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def export_graph(
    module: nn.Module,
    name: str,
    example: Mapping[str, torch.Tensor],
    varying: Mapping[str, Sequence[int]],
    folder: Path | None = None,
) -> Path:
    """``module``'s ONNX graph, exported once into ``folder`` (default: :func:`onnx_cache_dir`) as
    ``NAME.onnx`` and reused; ``module``'s modes stay. ``name`` names the graph (kind and weights'
    fingerprint), ``example`` gives the inputs (in ``module``'s argument order), ``varying`` each
    input's axes whose size may change (the output's first axis always may)."""
    folder = folder or onnx_cache_dir()
    path = folder / f"{name}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        modes = {part: part.training for part in module.modules()}
        module.eval()
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".onnx.tmp", delete=False) as handle:
            tmp = Path(handle.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on constant folding
                torch.onnx.export(
                    module,
                    tuple(example.values()),
                    str(tmp),
                    input_names=list(example),
                    output_names=["output"],
                    dynamic_axes={
                        **{key: {axis: f"{key}_{axis}" for axis in axes} for key, axes in varying.items()},
                        "output": {0: "n"},
                    },
                    opset_version=17,
                    dynamo=False,
                )
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
            for part, training in modes.items():
                part.training = training
    return path


def int8_graph(path: Path) -> Path:
    """The graph at ``path`` with int8 weights in its matrix products (activations quantized per
    call), written once beside it as ``NAME.int8.onnx``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_suffix(".int8.onnx")
    if not out.is_file():
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx.tmp", delete=False) as handle:
            tmp = Path(handle.name)
        root = logging.getLogger()
        root.addFilter(_no_preprocessing_advice)  # the quantizer logs it on the root logger; not needed here
        try:
            quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
            tmp.replace(out)
        finally:
            root.removeFilter(_no_preprocessing_advice)
            tmp.unlink(missing_ok=True)
    return out


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider to run pre-processing before quantization")
