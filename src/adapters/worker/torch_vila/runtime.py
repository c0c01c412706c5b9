"""Loads a VILA checkpoint into the two model ports (text generator and vision encoder)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.compute_threads import ComputeThreads
from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.device import resolve_device, resolve_dtype
from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.image_cache import ImageEmbeddingCache
from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    compress_tied_embeddings,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.layout import KeyMap, ModelLayout, detect_layout
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
from vilaserve.adapters.worker.torch_vila.llm_loading import keep_key, load_llm_weights
from vilaserve.adapters.worker.torch_vila.model_runner import TorchModelRunner
from vilaserve.adapters.worker.torch_vila.tokenization import (
    image_token_id,
    load_tokenizer,
    stop_token_ids,
)
from vilaserve.adapters.worker.torch_vila.vision_encoder import TorchVisionEncoder
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.domain.shared.conversation import ConversationTemplate, LlmShape, choose_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VilaRuntimeOptions:
    model_path: str
    quant_path: str | None = None
    precision: str = "W16A16"
    device: str = "auto"
    dtype: str = "auto"
    conv_template: str | None = None
    max_image_pixels: int = 64_000_000
    max_request_pixels: int | None = None  # all of a request's images (None: 4 x per image)
    embedding_bits: int = 8  # W4A16 only: the token embedding table in int8 (8) or 16-bit (16)
    vision_quantization: str = "none"  # "w8a8": the tower's linears in W8A8 (vision_w8a8.py)
    image_cache_mb: int = 256  # projected embeddings of recent images (0: no cache)
    kv_slots: int = 16  # KV-cache rows: running sequences plus prefixes kept for reuse
    max_model_len: int | None = None  # positions per KV row (None: the model's context)
    vision_tower: str | None = None  # LLaVA-1.5: the local folder of the tower its config names
    # CPU: one compute thread fewer per core other processes take (compute_threads.py).
    adaptive_threads: bool = True


@dataclass
class VilaRuntime:
    checkpoint: VilaCheckpoint
    model_runner: TorchModelRunner
    vision_encoder: TorchVisionEncoder | None
    executor: ModelExecutor

    @classmethod
    def load(cls, options: VilaRuntimeOptions) -> VilaRuntime:
        """Loads on the model thread (see executor.py): the process's torch work stays there."""
        executor = ModelExecutor()
        try:
            return executor.call(cls._load, options, executor)
        except BaseException:
            executor.shutdown()
            raise

    @classmethod
    def _load(cls, options: VilaRuntimeOptions, executor: ModelExecutor) -> VilaRuntime:
        check_options(options)
        started = time.perf_counter()
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        layout = detect_layout(options.model_path, options.vision_tower)
        tokenizer = load_tokenizer(layout.tokenizer_dir)
        model = load_language_model(options, layout, dtype, device)
        on_path = put_on_cpu_path(model)
        template = conversation_template(layout, tokenizer, options.conv_template)
        runner = text_runner(options, layout, model, tokenizer, template, executor, on_path.path)
        vision = vision_encoder(options, layout, model, tokenizer, dtype, device, executor)
        threads = adapt_compute_threads(options, device, executor)
        # One line that says what was found and how it will be served.
        log.info(
            "model loaded",
            extra={
                "path": str(layout.root),
                **layout.describe(),
                "precision": options.precision,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "template": template.name,
                "multimodal": vision is not None,
                "tokens_per_image": vision.tokens_per_image if vision else 0,
                "compute_path": on_path.path,
                "cpu_kernel_linears": on_path.kernel_linears,
                "native_decode": on_path.native_decode,
                "cpu_threads": threads if device.type == "cpu" else 0,
                "adaptive_threads": device.type == "cpu" and options.adaptive_threads,
                "kv_slots": runner.num_cache_rows,
                "kv_slot_length": runner.cache_row_length,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        return cls(layout.checkpoint, runner, vision, executor)


def check_options(options: VilaRuntimeOptions) -> None:
    """Refuses a precision, tower quantization or embedding width this runtime does not load."""
    if options.precision not in ("W16A16", "W4A16"):
        raise ValueError(f"--precision {options.precision}: expected W16A16 or W4A16")
    if options.vision_quantization not in ("none", "w8a8"):
        raise ValueError(
            f"--quantize-vision-tower {options.vision_quantization}: expected none or w8a8"
        )
    if options.embedding_bits not in (8, 16):
        raise ValueError(f"--embedding-bits {options.embedding_bits}: expected 8 or 16")


def load_language_model(
    options: VilaRuntimeOptions, layout: ModelLayout, dtype: torch.dtype, device: torch.device
) -> Llama:
    """The LLM at `options.precision`: W4A16 from AWQ weights, else 16-bit."""
    checkpoint = layout.checkpoint
    if options.precision == "W4A16":
        return load_w4a16_llm(checkpoint, options.quant_path, options.embedding_bits, dtype, device)
    from vilaserve.adapters.worker.awq.config_detection import is_awq_config

    if is_awq_config(checkpoint.llm_config) and options.quant_path is None:
        raise ValueError(
            f"{checkpoint.llm_dir} is a 4-bit AWQ checkpoint (quantization_config "
            "quant_method 'awq'): load it with --precision W4A16"
        )
    return load_llm(checkpoint, dtype, device, layout.llm_key_map)


def load_w4a16_llm(
    checkpoint: VilaCheckpoint,
    quant_path: str | None,
    embedding_bits: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Llama:
    """The AWQ LLM with its q/k/v and gate/up fused; the token embeddings in int8 unless
    `embedding_bits` is 16."""
    # Imported here: the 16-bit path needs none of the AWQ machinery.
    from vilaserve.adapters.worker.awq.loading import load_awq_llm
    from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16

    model = load_awq_llm(checkpoint, quant_path, dtype, device)
    model.fuse_projections(fuse_w4a16)
    if embedding_bits == 8:
        compress_token_embeddings(model)
        compress_tied_embeddings(model)
    return model


def conversation_template(
    layout: ModelLayout, tokenizer: Any, override: str | None
) -> ConversationTemplate:
    """`override` (--conv-template), else the family's template, else one chosen from the LLM."""
    template = pick_template(layout.checkpoint.llm_config, tokenizer, override or layout.template)
    if layout.family.startswith("NVILA") and template.chat_template is not None:
        # VILA renders [user] alone through the tokenizer's template, so that template's
        # own default system prompt applies, not one of ours.
        template = replace(template, system_message="")
    return template


def text_runner(
    options: VilaRuntimeOptions,
    layout: ModelLayout,
    model: Llama,
    tokenizer: Any,
    template: ConversationTemplate,
    executor: ModelExecutor,
    compute_path: str,
) -> TorchModelRunner:
    """The text generator over `model`, with its KV pool of `options.kv_slots` rows."""
    checkpoint = layout.checkpoint
    stop_ids = sorted(template_stop_ids(tokenizer, template))
    image_token = image_token_of(layout, tokenizer)
    return TorchModelRunner(
        model,
        tokenizer,
        template.with_stop_token_ids(stop_ids),
        executor,
        context_length(checkpoint.llm_config),
        stop_ids,
        image_wrap(checkpoint, tokenizer),
        compute_path,
        num_cache_rows=options.kv_slots,
        cache_row_length=options.max_model_len,
        image_token_id=image_token,
    )


def image_token_of(layout: ModelLayout, tokenizer: Any) -> int | None:
    """The vocabulary id that stands for an image, for families whose placeholder is a real
    token (None: VILA's -200 sentinel, or no vision)."""
    real_token = layout.image_tokens.real_token
    image_token = (
        image_token_id(tokenizer, real_token)
        if real_token is not None and layout.vision is not None
        else None
    )
    if layout.family == "llava-hf":
        # llava-hf names its image token in the config; the tokenizer must agree.
        checkpoint = layout.checkpoint
        configured = int(checkpoint.config.get("image_token_index", image_token or -1))
        if image_token != configured:
            raise ValueError(
                f"{checkpoint.root}/config.json: image_token_index {configured} is not the "
                f"tokenizer's <image> id {image_token}"
            )
    return image_token


def vision_encoder(
    options: VilaRuntimeOptions,
    layout: ModelLayout,
    model: Llama,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    executor: ModelExecutor,
) -> TorchVisionEncoder | None:
    """Tower, projector and preprocessing of a multimodal checkpoint (None: text only)."""
    vision = layout.vision
    if vision is None:
        return None
    end_embedding = image_end_embedding(layout, model, tokenizer)
    llm_hidden = int(layout.checkpoint.llm_config["hidden_size"])
    pipeline = VisionPipeline.from_layout(vision, llm_hidden, dtype, device, end_embedding)
    if options.vision_quantization == "w8a8":
        quantize_tower(pipeline, vision.tower.weights_dir, device)
    cache = None
    if options.image_cache_mb > 0:
        cache = ImageEmbeddingCache(options.image_cache_mb * 2**20, pipeline.preprocessing_tag)
    return TorchVisionEncoder(
        pipeline, executor, options.max_image_pixels, cache, options.max_request_pixels
    )


def image_end_embedding(layout: ModelLayout, model: Llama, tokenizer: Any) -> torch.Tensor | None:
    """The embeddings of the text that follows each image's features (NVILA's "\\n")."""
    end_text = layout.image_tokens.end_text
    if end_text is None:
        return None
    end_ids = tokenizer(end_text, add_special_tokens=False)["input_ids"]
    return embedding_rows(model, end_ids)


def adapt_compute_threads(
    options: VilaRuntimeOptions, device: torch.device, executor: ModelExecutor
) -> int:
    """On the CPU (unless --no-adaptive-threads), the model thread gives one compute thread up
    per core that other processes take. Returns the model thread's thread count."""
    threads = torch.get_num_threads()  # this (the model) thread's: torch's are per thread
    if device.type == "cpu" and options.adaptive_threads:
        follower = ComputeThreads.for_this_process(threads, torch.set_num_threads)
        if follower is not None:
            executor.before_each(follower.apply)
            follower.start()
    return threads


def quantize_tower(pipeline: VisionPipeline, weights_dir: Path, device: torch.device) -> None:
    """`--quantize-vision-tower w8a8` where an int8 GEMM runs, else a warning (16-bit tower)."""
    from vilaserve.adapters.worker.torch_vila.vision_w8a8 import (
        int8_path_here,
        load_smoothing,
        quantize_vision_tower,
    )

    if not int8_path_here(device):
        log.warning(
            "--quantize-vision-tower w8a8: no int8 GEMM on this device; the tower stays 16-bit",
            extra={"device": str(device)},
        )
        return
    factors = load_smoothing(weights_dir)
    swapped = quantize_vision_tower(pipeline.tower, factors)
    log.info("vision tower in W8A8", extra={"linears": swapped, "smoothed": factors is not None})


def load_llm(
    checkpoint: VilaCheckpoint,
    dtype: torch.dtype,
    device: torch.device,
    key_map: KeyMap | None = None,
) -> Llama:
    """The 16-bit LLM, streamed tensor by tensor (no second copy of the weights in memory);
    `key_map` renames checkpoint keys to ours and drops what is not the LLM's (LLaVA)."""
    model = Llama.empty(LlamaArgs.from_hf_config(checkpoint.llm_config), dtype, device)
    load_llm_weights(model, checkpoint.llm_dir, key_map or keep_key)
    return model.eval().requires_grad_(False)


def embedding_rows(model: Llama, ids: list[int]) -> torch.Tensor:
    """Embedding rows of `ids` (loading runs on the model thread already)."""
    with torch.inference_mode():
        return model.embed(torch.tensor(ids, dtype=torch.long, device=model.device)).clone()


def image_wrap(checkpoint: VilaCheckpoint, tokenizer: Any) -> tuple[str, str] | None:
    """`<im_start>`/`<im_end>` around each image, for checkpoints trained that way."""
    if not checkpoint.config.get("mm_use_im_start_end"):
        return None
    wrap = ("<im_start>", "<im_end>")
    missing = [t for t in wrap if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(
            f"{checkpoint.root}: mm_use_im_start_end is set but the tokenizer in "
            f"{checkpoint.llm_dir} has no {', '.join(missing)} token"
        )
    return wrap


def context_length(llm_config: dict[str, Any]) -> int:
    """VILA truncates at `tokenizer_model_max_length` (NVILA: `model_max_length`); otherwise
    the position limit."""
    limit = (
        llm_config.get("tokenizer_model_max_length")
        or llm_config.get("model_max_length")
        or llm_config["max_position_embeddings"]
    )
    return int(min(limit, llm_config.get("max_position_embeddings", limit)))


def pick_template(
    llm_config: dict[str, Any], tokenizer: Any, override: str | None
) -> ConversationTemplate:
    shape = LlmShape(
        vocab_size=int(llm_config["vocab_size"]),
        num_layers=int(llm_config["num_hidden_layers"]),
        num_heads=int(llm_config["num_attention_heads"]),
        model_type=str(llm_config.get("model_type", "llama")),
    )
    chat_template = getattr(tokenizer, "chat_template", None)
    return choose_template(
        shape, chat_template if isinstance(chat_template, str) else None, override
    )


def template_stop_ids(tokenizer: Any, template: ConversationTemplate) -> frozenset[int]:
    """The tokenizer's end token, the template's ids, and its stop strings that are tokens."""
    vocab = tokenizer.get_vocab()
    extra = [i for i in template.stop_token_ids if i < len(vocab)]
    extra += [vocab[s] for s in template.stop_str if s in vocab]
    return stop_token_ids(tokenizer, extra)
