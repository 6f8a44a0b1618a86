"""What a search's text pass costs, and what changes it: the description matcher's query encoder
(the demo's MiniLM) through ONNX Runtime, on real val query texts (the reference's catalog
description joined with an annotated caption, and the caption), wall and CPU time per pass, median
of alternating rounds, each variant's lowest cosine to PyTorch's features.

Variants: today's graph (float32, 2 threads that sleep between runs); its threads spinning; one
thread; the graph exported with eager attention and ONNX Runtime's BERT fusions (Attention,
SkipLayerNorm, BiasGelu, EmbedLayerNorm); today's int8 option (``serve --int8-queries``); int8
weights only (``MatMulNBits``, activations float; needs the ``onnx_ir`` package). Cases: one search
(2 texts), four searches in one pass (8 texts), four searches with prompts and captions in separate
passes, and one text of 4 and of 60 tokens (the fixed part of a pass).

    .venv/bin/python benchmarks/text_pass.py --model runs/demo/best
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fashion_cir.captioning import load_precomputed
from fashion_cir.data.captions import join_captions_val
from fashion_cir.models.cir import CIRModel
from fashion_cir.models.matcher import PooledEncoder
from fashion_cir.models.onnx_engine import export_graph, int8_graph

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-dataset"


def export(encoder: torch.nn.Module, example: dict, folder: Path, name: str) -> Path:
    """The graph the service exports (:func:`export_graph` of the pooled encoder), into ``folder``."""
    return export_graph(PooledEncoder(encoder), name, example, {"input_ids": [0, 1], "attention_mask": [0, 1]}, folder)


def fused(encoder: torch.nn.Module, example: dict, folder: Path) -> Path:
    """Exported with eager attention (the pattern ONNX Runtime's BERT fusion recognises), then fused."""
    from onnxruntime.transformers import optimizer

    attention = encoder.config._attn_implementation
    encoder.config._attn_implementation = "eager"
    try:
        raw = export(encoder, example, folder, "eager")
    finally:
        encoder.config._attn_implementation = attention
    config = encoder.config
    graph = optimizer.optimize_model(
        str(raw), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    print("fusions:", {k: v for k, v in graph.get_fused_operator_statistics().items() if v})
    graph.save_model_to_file(str(folder / "fused.onnx"))
    return folder / "fused.onnx"


def weight_only_int8(path: Path, folder: Path) -> Path | None:
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        print(f"weight-only int8 left out: {exc}")
        return None
    quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    out = folder / "nbits8.onnx"
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def session(path: Path, threads: int, spin: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def query_pairs(model: CIRModel, count: int) -> list[tuple[str, str]]:
    records = load_precomputed(SHARED / "attributes.jsonl")
    pairs = []
    for row in json.loads((SHARED / "captions" / "cap.clothing.val.json").read_text()):
        caption = join_captions_val(row["captions"])
        pairs.append((model.query_text(caption, records[row["candidate"]].description), caption))
    return random.Random(0).sample(pairs, min(count, len(pairs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/best")
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    model = CIRModel.load(args.model)
    matcher = model.matcher
    if matcher is None:
        raise SystemExit(f"{args.model} has no description matcher")
    encoder = matcher.query_encoder.eval()
    pairs = query_pairs(model, args.pairs)
    lengths = [len(matcher.tokenizer(t)["input_ids"]) for pair in pairs for t in pair]
    print(
        f"{len(pairs)} val queries; tokens per query text {np.mean(lengths[::2]):.1f}, per caption {np.mean(lengths[1::2]):.1f}"
    )

    exact = [matcher.embed([q, c], "query") for q, c in pairs]  # PyTorch's, before any export touches the encoder
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        example = matcher.tokenize(["a red dress", "same but shorter and in navy"])
        today = export(encoder, example, folder, "today")
        graphs = {
            "today (float32, 2 threads, sleeping)": (today, 2, False),
            "threads spinning": (today, 2, True),
            "one thread": (today, 1, False),
            "BERT fusions": (fused(encoder, example, folder), 2, False),
            "int8 (serve --int8-queries)": (int8_graph(today), 2, False),
        }
        nbits = weight_only_int8(today, folder)
        if nbits is not None:
            graphs["int8 weights only"] = (nbits, 2, False)
        sessions = {name: session(path, threads, spin) for name, (path, threads, spin) in graphs.items()}

        def feed(texts: list[str]) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in matcher.tokenize(texts).items()}

        searches = [[feed([q, c])] for q, c in pairs]
        fours = [pairs[i : i + 4] for i in range(0, len(pairs) - 3, 4)]
        cases = {
            "1 search (2 texts, one pass)": searches,
            "4 searches (8 texts, one pass)": [[feed([t for pair in four for t in pair])] for four in fours],
            "4 searches (query texts and captions in two passes)": [
                [feed([q for q, _ in four]), feed([c for _, c in four])] for four in fours
            ],
        }
        long_text = " ".join(pairs[0][0].split() * 4)
        short_ids = matcher.tokenize(["a red dress"])
        long_ids = {k: v[:, :60] for k, v in matcher.tokenize([long_text]).items()}
        cases["1 text of 4 tokens"] = [[{k: v.numpy() for k, v in short_ids.items()}]] * 40
        cases[f"1 text of {long_ids['input_ids'].shape[1]} tokens"] = [
            [{k: v.numpy() for k, v in long_ids.items()}]
        ] * 40

        for name, s in sessions.items():
            cosine = min(
                float((torch.nn.functional.normalize(torch.from_numpy(s.run(None, f[0])[0]), dim=-1) * e).sum(-1).min())
                for f, e in zip(searches, exact)
            )
            print(f"{name:40s} lowest cosine to PyTorch {cosine:.4f}")

        for case, passes in cases.items():
            names = list(sessions) if not case.startswith(("4 searches (query", "1 text")) else list(sessions)[:1]
            times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    s = sessions[name]
                    s.run(None, passes[0][0])
                    wall, cpu = time.perf_counter(), time.process_time()
                    for search in passes:
                        for f in search:
                            s.run(None, f)
                    times[name].append(
                        (
                            (time.perf_counter() - wall) * 1000 / len(passes),
                            (time.process_time() - cpu) * 1000 / len(passes),
                        )
                    )
            base = np.median([w for w, _ in times[names[0]]])
            for name in names:
                wall_ms, cpu_ms = np.median(np.array(times[name]), axis=0)
                print(
                    f"{case:52s} {name:40s} wall {wall_ms:6.2f} ms (x{base / wall_ms:.2f})  CPU {cpu_ms:6.2f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
