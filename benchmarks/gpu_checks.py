"""The GPU checks of issues 2, 4 and 5 in one script (run on a lent GPU machine):

1. ViT-B/32 image-encoding throughput, fp32 / fp16 / bf16, batch 256 (random init).
2. llava-hf captioning throughput through LlavaHFCaptioner with a randomly initialised 7B-shaped
   LLaVA-1.5 (CLIP ViT-L/14-336 + Llama-7B shapes) in bf16, batch 16.
3. Stage-1 step time and peak memory, ViT-B/32 both encoders trained, bf16, batch 128 and 512.
4. Stage-2 throughput: text encoder trained against a 100k-entry static bank, batch 256.
5. Queries of a model on the GPU from features on the CPU (what evaluation, validation and the
   service pass): a Combiner model, and a matcher sharing the offline text tower.

    PYTHONPATH=src python benchmarks/gpu_checks.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def vit_throughput(results: dict) -> None:
    from fashion_cir.models.factory import create_backbone

    backbone = create_backbone("openclip:ViT-B-32:random").cuda().eval()
    pixels = torch.randn(256, 3, 224, 224, device="cuda")
    for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):

        def step():
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                backbone.encode_images(pixels)

        seconds = timed(step, 3, 10)
        results[f"vit_b32_encode_{name}_img_per_s"] = round(256 / seconds, 1)
        print(f"ViT-B/32 encode {name} batch 256: {256 / seconds:,.0f} img/s", flush=True)


def llava_throughput(results: dict, batch: int = 16, new_tokens: int = 128) -> None:
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from fashion_cir.captioning.base import CaptionRequest
    from fashion_cir.captioning.llava_hf import LlavaHFCaptioner

    words = " ".join(f"w{i}" for i in range(32000))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [words],
        trainers.WordLevelTrainer(vocab_size=40000, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"]),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    start = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"random LLaVA: {params / 1e9:.2f}B parameters built in {time.perf_counter() - start:.0f}s", flush=True)
    captioner = LlavaHFCaptioner.from_components(processor, model, batch_size=batch, max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        requests = []
        for i in range(batch):
            path = Path(tmp) / f"{i}.jpg"
            Image.effect_noise((400, 533), 60 + i).convert("RGB").save(path)
            requests.append(CaptionRequest(image_id=str(i), path=path))
        captioner.answer(requests[:2])  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        answers = captioner.answer(requests)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    results["llava7b_bf16_batch"] = batch
    results["llava7b_new_tokens"] = new_tokens
    results["llava7b_caption_img_per_s"] = round(batch / seconds, 2)
    results["llava7b_generated_tok_per_s"] = round(batch * new_tokens / seconds, 0)
    results["llava7b_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(
        f"LLaVA-7B-shaped bf16 batch {batch}, {new_tokens} new tokens: {batch / seconds:.2f} img/s "
        f"({batch * new_tokens / seconds:,.0f} tok/s), answers are garbage as expected: {str(answers[0])[:40]!r}",
        flush=True,
    )
    del model, captioner
    torch.cuda.empty_cache()


def stage1_steps(results: dict) -> None:
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.training.losses import InBatchContrastiveLoss

    model = CIRModel(create_backbone("openclip:ViT-B-32:random"), "sum_raw").cuda().train()
    model.backbone.set_trainable(["image", "text"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-6, eps=1e-7)
    loss_fn = InBatchContrastiveLoss(100.0)
    for batch in (128, 512):
        ref = torch.randn(batch, 3, 224, 224, device="cuda")
        tgt = torch.randn(batch, 3, 224, 224, device="cuda")
        tokens = torch.randint(1, 49000, (batch, 77), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                queries = model.compose(model.backbone.encode_images(ref), model.backbone.encode_texts(tokens))
                targets = F.normalize(model.backbone.encode_images(tgt), dim=-1)
                loss = loss_fn(queries.float(), targets.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, 2, 5)
        peak = torch.cuda.max_memory_allocated() / 2**30
        results[f"stage1_vitb32_bf16_b{batch}_ms_per_step"] = round(seconds * 1000, 1)
        results[f"stage1_vitb32_bf16_b{batch}_peak_gib"] = round(peak, 2)
        print(f"stage 1 ViT-B/32 bf16 batch {batch}: {seconds * 1000:.0f} ms/step, peak {peak:.1f} GiB", flush=True)


def stage2_throughput(results: dict, bank_size: int = 100_000, batch: int = 256) -> None:
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.training.losses import BankInfoNCELoss

    model = CIRModel(create_backbone("openclip:ViT-B-32:random"), "sum_raw").cuda().train()
    model.backbone.set_trainable(["text"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    bank = torch.randn(bank_size, 512, device="cuda")
    loss_fn = BankInfoNCELoss(0.02)
    tokens = torch.randint(1, 49000, (batch, 77), device="cuda")
    positives = torch.randint(0, bank_size, (batch,), device="cuda")
    refs = bank[torch.randint(0, bank_size, (batch,), device="cuda")]
    bank_norm = F.normalize(bank, dim=-1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            queries = model.compose(refs, model.backbone.encode_texts(tokens))
            loss = loss_fn(queries.float(), bank_norm, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, 2, 10)
    results["stage2_bank_size"] = bank_size
    results["stage2_batch"] = batch
    results["stage2_ms_per_step"] = round(seconds * 1000, 1)
    results["stage2_queries_per_s"] = round(batch / seconds, 0)
    results["stage2_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(
        f"stage 2 text encoder vs {bank_size:,}-entry bank, batch {batch}: {seconds * 1000:.0f} ms/step, "
        f"{batch / seconds:,.0f} queries/s, {bank_size - 1:,} negatives per query",
        flush=True,
    )


def queries_on_gpu(results: dict) -> None:
    """encode_queries / query_vectors of models on cuda, given CPU reference features (the feature
    cache's); the CPU results are the reference."""
    from fashion_cir.models.cir import CIRModel
    from fashion_cir.models.combiner import Combiner
    from fashion_cir.models.factory import create_backbone
    from fashion_cir.models.matcher import DescriptionMatcher

    captions, descriptions = ["is red with long sleeves", "is shorter"], ["a white t-shirt", None]
    torch.manual_seed(0)
    backbone = create_backbone("tiny")
    combined = CIRModel(backbone, "combiner", Combiner(backbone.feature_dim)).eval()
    offline = create_backbone("offline")
    shared = CIRModel(
        offline, "sum", matcher=DescriptionMatcher(offline.towers.text, query_encoder=offline.text_tower)
    ).eval()
    for name, model in (("combiner", combined), ("shared_matcher", shared)):
        reference = torch.randn(2, model.backbone.feature_dim)
        with torch.no_grad():
            on_cpu = model.query_vectors(model.encode_queries(reference, captions, descriptions))
            try:
                model.cuda()
                on_gpu = model.query_vectors(model.encode_queries(reference, captions, descriptions)).cpu()
                results[f"queries_{name}_max_abs_diff"] = float((on_gpu - on_cpu).abs().max())
            except Exception as exc:  # noqa: BLE001 (the point of the check)
                results[f"queries_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                model.cpu()
        print(f"queries on the GPU ({name}): {results.get(f'queries_{name}_error') or 'ok'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    parser.add_argument("--skip", default="", help="comma list of: vit,llava,stage1,stage2,queries")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(results, flush=True)
    skip = set(args.skip.split(","))
    for name, fn in (
        ("vit", vit_throughput),
        ("stage1", stage1_steps),
        ("stage2", stage2_throughput),
        ("queries", queries_on_gpu),
        ("llava", llava_throughput),
    ):
        if name in skip:
            continue
        try:
            fn(results)
        except Exception as exc:  # report and go on: one failing check must not lose the others
            results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{name} failed: {exc}", flush=True)
        torch.cuda.empty_cache()  # the check's models and tensors went with its frame
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
