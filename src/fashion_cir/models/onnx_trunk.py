"""A frozen convolutional trunk run by ONNX Runtime on the CPU: the same features as PyTorch's
(within float rounding, tested) in less time on this kind of network (depthwise convolutions).
The graph is exported once per trunk fingerprint into a cache folder and reused."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
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


def onnx_runner(
    module: nn.Module, key: str, image_size: int, folder: Path | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pixels [N, 3, S, S] -> module(pixels)`` run by ONNX Runtime, with as many threads as torch
    uses; ``key`` names the exported graph (the weights' fingerprint)."""
    import onnxruntime as ort

    folder = folder or onnx_cache_dir()
    path = folder / f"trunk-{key}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        was_training = module.training
        module.eval()
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".onnx.tmp", delete=False) as handle:
            tmp = Path(handle.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on constant folding
                torch.onnx.export(
                    module,
                    (torch.zeros(2, 3, image_size, image_size),),
                    str(tmp),
                    input_names=["pixels"],
                    output_names=["features"],
                    dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                    opset_version=17,
                    dynamo=False,
                )
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
            module.train(was_training)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"pixels": pixels.detach().cpu().float().contiguous().numpy()})[0])

    return run
