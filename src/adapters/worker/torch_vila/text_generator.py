"""The `TextGenerator` port on our own Llama: prompt + image embeddings in, tokens out.

Per request: tokenize (images become the -200 placeholder), splice image embeddings, prefill
into a KV cache sized for this request, then decode one token per model-thread hop so that
concurrent requests interleave and the event loop never waits on torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.sampling import Sampler
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    IncrementalDetokenizer,
    tokenize_with_images,
)
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import ContextOverflow, InvalidRequest, OutOfDeviceMemory
from vilaserve.domain.shared.generation import FinishReason, GenerationStep, SamplingParams
from vilaserve.domain.worker.ports import ImageFeatures, TextGenerator


class TorchImageFeatures(ImageFeatures):
    """Projected image embeddings [N, tokens_per_image, llm_hidden] in the LLM's dtype."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    @property
    def num_images(self) -> int:
        return int(self.embeddings.shape[0])


class TorchTextGenerator(TextGenerator):
    def __init__(
        self,
        model: Llama,
        tokenizer: Any,
        template: ConversationTemplate,
        executor: ModelExecutor,
        context_length: int,
        stop_token_ids: Sequence[int],
        image_wrap: tuple[str, str] | None = None,
        compute_path: str | None = None,
    ) -> None:
        self._model = model
        self._compute_path = compute_path
        self._tokenizer = tokenizer
        self._template = template
        self._executor = executor
        self._context_length = context_length
        self._stop_ids = frozenset(stop_token_ids)
        # Checkpoints trained with `mm_use_im_start_end` see each image between two tokens.
        self._image_wrap = image_wrap

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def compute_path(self) -> str | None:
        return self._compute_path

    @property
    def conversation_template(self) -> ConversationTemplate:
        return self._template

    def _tokenize(self, prompt: str) -> list[int]:
        if self._image_wrap is not None:
            start, end = self._image_wrap
            prompt = prompt.replace(IMAGE_TOKEN, f"{start}{IMAGE_TOKEN}{end}")
        return tokenize_with_images(self._tokenizer, prompt)

    def count_tokens(self, text: str) -> int:
        ids = self._tokenize(text)
        return sum(1 for i in ids if i != IMAGE_TOKEN_INDEX)

    def generate(
        self, prompt: str, images: ImageFeatures | None, params: SamplingParams
    ) -> AsyncIterator[GenerationStep]:
        ids = self._tokenize(prompt)
        n_slots = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
        embeddings = images.embeddings if isinstance(images, TorchImageFeatures) else None
        n_images = 0 if embeddings is None else int(embeddings.shape[0])
        if n_slots != n_images:
            raise InvalidRequest(
                f"the prompt has {n_slots} image placeholders for {n_images} images"
            )
        per_image = 0 if embeddings is None else int(embeddings.shape[1])
        prompt_len = len(ids) - n_slots + n_slots * per_image
        if prompt_len >= self._context_length:
            raise ContextOverflow(
                f"the prompt takes {prompt_len} positions ({len(ids) - n_slots} text tokens + "
                f"{n_slots} images x {per_image}); the model's context is "
                f"{self._context_length}, leaving no room to generate"
            )
        max_new = min(params.max_new_tokens, self._context_length - prompt_len)
        stop_ids = self._stop_ids | frozenset(params.stop_token_ids)
        session = _DecodeSession(
            self._model, self._tokenizer, ids, embeddings, params, prompt_len, max_new, stop_ids
        )
        return self._run(session)

    async def _run(self, session: _DecodeSession) -> AsyncIterator[GenerationStep]:
        try:
            await self._executor.run(_guarded, session.prefill)
            while True:
                step = await self._executor.run(_guarded, session.advance)
                yield step
                if step.finish_reason is not None:
                    return
        finally:
            session.release()


def _guarded(fn: Any) -> Any:
    try:
        with torch.inference_mode():
            return fn()
    except torch.OutOfMemoryError as exc:
        raise OutOfDeviceMemory(f"the device ran out of memory: {exc}") from exc


class _DecodeSession:
    """The state of one generation; used only on the model thread."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Any,
        ids: list[int],
        images: torch.Tensor | None,
        params: SamplingParams,
        prompt_len: int,
        max_new: int,
        stop_ids: frozenset[int],
    ) -> None:
        self._model = model
        self._ids = ids
        self._images = images
        self._sampler = Sampler(params, model.device)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._prompt_len = prompt_len
        self._max_new = max_new
        self._stop_ids = stop_ids
        self._cache: Any = None
        self._next: torch.Tensor | None = None
        self._position = 0
        self._produced = 0
        self._must_feed = False

    def prefill(self) -> None:
        model = self._model
        embeds = _splice(model, self._ids, self._images)
        self._cache = model.new_cache(1, self._prompt_len + self._max_new)
        logits = model(self._cache, 0, inputs_embeds=embeds)
        self._next = self._sampler(logits[0, -1])
        self._position = self._prompt_len
        self._images = None  # the embeddings live on in the KV cache only

    def advance(self) -> GenerationStep:
        """Feed the last token (if any), read the next one, and say what text it adds."""
        assert self._next is not None
        if self._must_feed:
            logits = self._model(self._cache, self._position, input_ids=self._next.view(1, 1))
            self._position += 1
            self._next = self._sampler(logits[0, -1])
        token = int(self._next)  # the one host sync per step: streaming needs the id
        self._produced += 1
        finish: FinishReason | None = None
        if token in self._stop_ids:
            text, finish = self._detok.flush(), "stop"
        else:
            text = self._detok.push(token)
            if self._produced >= self._max_new:
                text, finish = text + self._detok.flush(), "length"
        self._must_feed = finish is None
        return GenerationStep(text, self._prompt_len, self._produced, finish)

    def release(self) -> None:
        self._cache = None
        self._next = None


def _splice(model: Llama, ids: list[int], images: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with each -200 replaced by one image's rows (VILA's order)."""
    device = model.device
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    text = model.embed(ids_t.clamp(min=0).unsqueeze(0))[0]
    if images is None:
        return text.unsqueeze(0)
    pieces: list[torch.Tensor] = []
    start = 0
    slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    for k, slot in enumerate(slots):
        pieces += [text[start:slot], images[k].to(text.dtype)]
        start = slot + 1
    pieces.append(text[start:])
    return torch.cat(pieces).unsqueeze(0)
