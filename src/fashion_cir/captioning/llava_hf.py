"""Backend for Hugging Face image-text-to-text models (LLaVA 1.5 by default; any model id or local
folder that ``AutoModelForImageTextToText`` + ``AutoProcessor`` load). transformers is imported here
only. Batched greedy generation, fp16/bf16 on GPU, ``device_map="auto"`` on GPU."""

from __future__ import annotations

from pathlib import Path

from ..data.images import open_image
from ..errors import DataError, ModelError
from .base import Captioner, CaptionRequest, RequestFailed
from .vocab import DEFAULT_VOCABULARY, Vocabulary

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
LLAVA15_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"


def _load(model_id: str, dtype, device_map):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, device_map=device_map)
    except (OSError, ValueError) as exc:
        where = (
            f"the folder {model_id} does not hold a complete model"
            if Path(model_id).exists()
            else f"{model_id!r} is not a local folder and could not be fetched from the Hugging Face hub"
        )
        raise ModelError(
            f"could not load the captioning model: {where} ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Download it where the hub is reachable (huggingface-cli download {DEFAULT_MODEL} --local-dir DIR) "
            "and pass the folder as the model, e.g. --model DIR"
        ) from exc
    return processor, model


class LlavaHFCaptioner(Captioner):
    """Greedy, batched captioning with a local transformers model."""

    def __init__(
        self,
        model_id: str = DEFAULT_MODEL,
        vocab: Vocabulary = DEFAULT_VOCABULARY,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        device: str | None = None,
    ):
        super().__init__(vocab)
        import torch

        self.model_id, self.batch_size, self.max_new_tokens = model_id, batch_size, max_new_tokens
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.processor, self.model = _load(model_id, dtype, "auto" if device == "cuda" else device)
        else:
            self.processor, self.model = _load(model_id, torch.float32, None)
            self.model.to(device)
        self.model.eval()
        self.processor.tokenizer.padding_side = "left"  # generation continues from the right end

    @classmethod
    def from_components(
        cls, processor, model, vocab: Vocabulary = DEFAULT_VOCABULARY, batch_size: int = 8, max_new_tokens: int = 256
    ) -> LlavaHFCaptioner:
        """A captioner around an already built processor and model (benchmarks, custom loading)."""
        captioner = cls.__new__(cls)
        Captioner.__init__(captioner, vocab)
        captioner.model_id = getattr(model, "name_or_path", "in-memory")
        captioner.batch_size, captioner.max_new_tokens = batch_size, max_new_tokens
        captioner.processor, captioner.model = processor, model.eval()
        captioner.processor.tokenizer.padding_side = "left"
        return captioner

    def _text(self, request: CaptionRequest) -> str:
        prompt = self.prompt(request)
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA15_FORMAT.format(prompt=prompt)

    def answer(self, requests: list[CaptionRequest]) -> list[str | RequestFailed]:
        import torch

        answers: list[str | RequestFailed] = [RequestFailed("not run")] * len(requests)
        images, texts, slots = [], [], []
        for index, request in enumerate(requests):
            try:
                images.append(open_image(request.path))
            except DataError as exc:
                answers[index] = RequestFailed(str(exc))
                continue
            texts.append(self._text(request))
            slots.append(index)
        if not slots:
            return answers
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        pad_id = self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for index, text in zip(slots, self.processor.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[index] = text.strip()
        return answers
