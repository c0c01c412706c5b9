"""The `ModelRunner` port on our own Llama: the engine's batches run here, on the model thread.

A KV pool of `num_cache_rows` rows x `cache_row_length` positions is allocated once (on the
CPU its pages are taken only as positions fill). A step runs every decode row in one batched
forward (each at its own position of its own cache row), then each prefill chunk into its
cache row, then samples all of them at once: one host sync per step, for the token ids the
streams need (on a GPU a step with prompt chunks waits once more, before its sampling, so that
its model work and its sampling are timed apart: `last_step_timing`). Steps run on the model
thread (executor.py), queued by the engine through `submit`.

Rows of requests with an output constraint are masked before the sampling (token_masks.py),
and their guides take the sampled token after it; a step whose batch holds no constrained
prompt (`ModelBatch.constrained`) does none of that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vilaserve.adapters.worker.torch_vila.constraints import LlguidanceConstraint
from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.sampling import Sampler
from vilaserve.adapters.worker.torch_vila.token_guide import TokenGuide
from vilaserve.adapters.worker.torch_vila.token_masks import TokenMasks
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    IncrementalDetokenizer,
    tokenize_with_image_token,
    tokenize_with_images,
)
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import ContextOverflow, InvalidRequest, OutOfDeviceMemory
from vilaserve.domain.shared.generation import SamplingParams
from vilaserve.domain.worker.batch import ModelBatch, PositionKey, StepTiming
from vilaserve.domain.worker.first_token import NO_IMAGES, ImageTimings
from vilaserve.domain.worker.ports import (
    CompiledConstraint,
    Detokenizer,
    ImageFeatures,
    ModelRunner,
    PreparedPrompt,
)


class TorchImageFeatures(ImageFeatures):
    """Projected image embeddings, one [positions, llm_hidden] tensor per image in the LLM's
    dtype (NVILA's pictures take different numbers of positions), a content key per image
    (a hash of its bytes and preprocessing) for prefix matching, and how long they took."""

    def __init__(
        self,
        embeddings: Sequence[torch.Tensor] | torch.Tensor,
        image_keys: Sequence[str] = (),
        timings: ImageTimings = NO_IMAGES,
    ) -> None:
        self.embeddings: list[torch.Tensor] = list(embeddings)
        self.image_keys = tuple(image_keys)
        self._timings = timings

    @property
    def num_images(self) -> int:
        return len(self.embeddings)

    @property
    def timings(self) -> ImageTimings:
        return self._timings


class TorchPrompt(PreparedPrompt):
    """Token ids with image placeholders, the images' embeddings until the prompt is
    prefilled, the request's own sampler (its seed's generator) and, under an output
    constraint, its own guide (its state in the constraint)."""

    def __init__(
        self,
        ids: list[int],
        images: list[torch.Tensor] | None,
        keys: list[PositionKey],
        max_new: int,
        stop_ids: frozenset[int],
        sampler: Sampler,
        guide: TokenGuide | None = None,
    ) -> None:
        self.ids = ids
        self._images = images
        self._keys = keys
        self._max_new = max_new
        self._stop_ids = stop_ids
        self.sampler = sampler
        self.guide = guide
        self._embeds: torch.Tensor | None = None

    @property
    def keys(self) -> Sequence[PositionKey]:
        return self._keys

    @property
    def max_new_tokens(self) -> int:
        return self._max_new

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def constrained(self) -> bool:
        return self.guide is not None

    @property
    def constraint_failed(self) -> bool:
        return self.guide is not None and self.guide.failed

    def embeddings(self, model: Llama, start: int, end: int) -> torch.Tensor:
        """Input embeddings of positions [start, end) as [1, end - start, hidden]."""
        if self._embeds is None:
            self._embeds = _splice(model, self.ids, self._images)
        return self._embeds[:, start:end]

    def prefilled(self) -> None:
        # The prompt lives on in the KV cache only.
        self._embeds = None
        self._images = None


class TorchModelRunner(ModelRunner[TorchPrompt]):
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
        num_cache_rows: int = 8,
        cache_row_length: int | None = None,
        image_token_id: int | None = None,
    ) -> None:
        """`image_token_id`: the vocabulary token that stands for an image (NVILA, llava-hf);
        None: VILA-1.5/LLaVA's `<image>` text, split out as the -200 sentinel."""
        self.model = model
        self._image_token_id = image_token_id
        self._compute_path = compute_path
        self._tokenizer = tokenizer
        self._template = template
        self._executor = executor
        self._context_length = context_length
        self._stop_ids = frozenset(stop_token_ids)
        # Checkpoints trained with `mm_use_im_start_end` see each image between two tokens.
        self._image_wrap = image_wrap
        self._num_cache_rows = num_cache_rows
        self._cache_row_length = min(cache_row_length or context_length, context_length)
        self.cache = model.new_cache(num_cache_rows, self._cache_row_length)
        self._on_cuda = torch.device(model.device).type == "cuda"
        # The last step with prompt chunks: its model work, then its sampling (seconds).
        self._forward_s = 0.0
        self._sample_s = 0.0
        self._masks: TokenMasks | None = None  # made by the first step with a constrained row

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def compute_path(self) -> str | None:
        return self._compute_path

    @property
    def conversation_template(self) -> ConversationTemplate:
        return self._template

    @property
    def num_cache_rows(self) -> int:
        return self._num_cache_rows

    @property
    def cache_row_length(self) -> int:
        return self._cache_row_length

    def _tokenize(self, prompt: str) -> list[int]:
        if self._image_wrap is not None:
            start, end = self._image_wrap
            prompt = prompt.replace(IMAGE_TOKEN, f"{start}{IMAGE_TOKEN}{end}")
        if self._image_token_id is not None:
            return tokenize_with_image_token(self._tokenizer, prompt, self._image_token_id)
        return tokenize_with_images(self._tokenizer, prompt)

    def count_tokens(self, text: str) -> int:
        ids = self._tokenize(text)
        return sum(1 for i in ids if i != IMAGE_TOKEN_INDEX)

    def detokenizer(self) -> Detokenizer:
        return IncrementalDetokenizer(self._tokenizer)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (the constraint compiler reads its vocabulary)."""
        return self._tokenizer

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """The ids that end an answer: the tokenizer's and the template's end tokens."""
        return self._stop_ids

    def prepare(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        constraint: CompiledConstraint | None = None,
    ) -> TorchPrompt:
        guide = _guide_for(constraint)
        ids = self._tokenize(prompt)
        n_placeholders = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
        features = images if isinstance(images, TorchImageFeatures) else None
        embeddings = None if features is None else features.embeddings
        n_images = 0 if embeddings is None else len(embeddings)
        if n_placeholders != n_images:
            raise InvalidRequest(
                f"the prompt has {n_placeholders} image placeholders for {n_images} images"
            )
        lengths = [int(e.shape[0]) for e in embeddings or ()]
        prompt_len = len(ids) - n_placeholders + sum(lengths)
        room = self._cache_row_length
        if prompt_len >= room:
            limit = "context" if room == self._context_length else "per-sequence cache length"
            raise ContextOverflow(
                f"the prompt takes {prompt_len} positions "
                f"({len(ids) - n_placeholders} text tokens + {sum(lengths)} "
                f"for {n_placeholders} image(s)); the model's {limit} is {room}, "
                "leaving no room to generate"
            )
        image_keys = features.image_keys if features is not None else ()
        stop_ids = (frozenset() if params.ignore_eos else self._stop_ids) | frozenset(
            params.stop_token_ids
        )
        if isinstance(constraint, LlguidanceConstraint):
            # A complete answer allows only these: they end it, ignore_eos or not.
            stop_ids |= constraint.end_token_ids
        return TorchPrompt(
            ids,
            embeddings,
            _position_keys(ids, image_keys, lengths),
            min(params.max_new_tokens, room - prompt_len),
            stop_ids,
            Sampler(params, self.model.device),
            guide,
        )

    @property
    def last_step_timing(self) -> StepTiming:
        return StepTiming(self._forward_s, self._sample_s)

    def submit(self, work: Callable[[], None]) -> None:
        self._executor.submit(work)

    def execute(self, batch: ModelBatch[TorchPrompt]) -> list[int]:
        try:
            with torch.inference_mode():
                return self._step(batch)
        except torch.OutOfMemoryError as exc:
            raise OutOfDeviceMemory(f"the device ran out of memory: {exc}") from exc

    def _step(self, batch: ModelBatch[TorchPrompt]) -> list[int]:
        # Only steps with prompt chunks are timed (a request's first token); decode steps not.
        started = time.perf_counter() if batch.prefills else 0.0
        model, cache = self.model, self.cache
        logits: list[torch.Tensor] = []
        sampled: list[TorchPrompt] = []  # whose rows the logits are, in order
        if batch.decodes:
            cache_rows = torch.tensor([d.cache_row for d in batch.decodes], dtype=torch.int64)
            positions = torch.tensor([d.position for d in batch.decodes], dtype=torch.int64)
            tokens = torch.tensor([d.token for d in batch.decodes], dtype=torch.int64)
            logits.append(model.decode_rows(cache, cache_rows, positions, tokens))
            sampled.extend(d.prompt for d in batch.decodes)
        if len(batch.prefills) > 1:
            # Several prompts' chunks in one forward: each linear is one GEMM over all their
            # rows (a GEMM runs faster per row with more rows: tiles shared, weights read once).
            parts = [
                (c.cache_row, c.start, c.prompt.embeddings(model, c.start, c.end))
                for c in batch.prefills
            ]
            out = model.prefill_packed(cache, parts)
            for index, chunk in enumerate(batch.prefills):
                if chunk.samples:
                    logits.append(out[index : index + 1])
                    sampled.append(chunk.prompt)
                    chunk.prompt.prefilled()
        elif batch.prefills:
            chunk = batch.prefills[0]
            embeds = chunk.prompt.embeddings(model, chunk.start, chunk.end)
            out = model(cache.row(chunk.cache_row), chunk.start, inputs_embeds=embeds)
            if chunk.samples:
                logits.append(out[:, -1])
                sampled.append(chunk.prompt)
                chunk.prompt.prefilled()
        if not batch.prefills:  # decodes only: no request's first token, nothing to time
            return self._sample(logits, sampled, batch.constrained)
        if self._on_cuda:
            # Kernels run after their launch: without this wait the sampling's host sync
            # would be charged with the prefill's work.
            torch.cuda.synchronize(model.device)
        forwarded = time.perf_counter()
        tokens = self._sample(logits, sampled, batch.constrained)
        self._forward_s = forwarded - started
        self._sample_s = time.perf_counter() - forwarded
        return tokens

    def _sample(
        self, parts: list[torch.Tensor], prompts: list[TorchPrompt], constrained: bool
    ) -> list[int]:
        """The constrained rows masked (when the batch has any), then every row sampled; their
        guides take the tokens."""
        if not parts:
            return []
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        if not constrained:
            return _choose(logits, [p.sampler for p in prompts])
        guided = [(row, p.guide) for row, p in enumerate(prompts) if p.guide is not None]
        if guided:
            self._token_masks(guided[0][1].vocab_size).apply(logits, guided)
        tokens = _choose(logits, [p.sampler for p in prompts])
        for row, guide in guided:
            guide.consume(tokens[row])
        return tokens

    def _token_masks(self, vocab_size: int) -> TokenMasks:
        masks = self._masks
        if masks is None or masks.vocab_size != vocab_size:
            masks = TokenMasks(self._num_cache_rows, vocab_size, torch.device(self.model.device))
            self._masks = masks
        return masks


def _guide_for(constraint: CompiledConstraint | None) -> TokenGuide | None:
    if constraint is None:
        return None
    if not isinstance(constraint, LlguidanceConstraint):
        raise InvalidRequest(
            f"the output constraint was compiled by {type(constraint).__name__}, "
            "which this model runner cannot follow"
        )
    return constraint.guide()


def _choose(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """Greedy rows in one argmax, the others each with its own generator; one host sync."""
    if all(s.is_greedy for s in samplers):
        return logits.argmax(dim=-1).tolist()  # type: ignore[no-any-return]
    chosen = logits.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if not sampler.is_greedy:
            chosen[row] = sampler(logits[row])
    return chosen.tolist()  # type: ignore[no-any-return]


def _position_keys(
    ids: list[int], image_keys: Sequence[str], lengths: Sequence[int]
) -> list[PositionKey]:
    """Token ids for text; (image key, row) for each image position; an image without a key
    (never two alike) gets a key no other prompt shares."""
    keys: list[PositionKey] = []
    image = 0
    for token in ids:
        if token != IMAGE_TOKEN_INDEX:
            keys.append(token)
            continue
        tag: object = image_keys[image] if image < len(image_keys) else object()
        keys.extend((tag, row) for row in range(lengths[image]))
        image += 1
    return keys


def _splice(model: Llama, ids: list[int], images: list[torch.Tensor] | None) -> torch.Tensor:
    """Token embeddings with each -200 replaced by one image's rows (VILA's order)."""
    device = model.device
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    text = model.embed(ids_t.clamp(min=0).unsqueeze(0))[0]
    if images is None:
        return text.unsqueeze(0)
    pieces: list[torch.Tensor] = []
    start = 0
    placeholders = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    for k, placeholder in enumerate(placeholders):
        pieces += [text[start:placeholder], images[k].to(text.dtype)]
        start = placeholder + 1
    pieces.append(text[start:])
    return torch.cat(pieces).unsqueeze(0)
