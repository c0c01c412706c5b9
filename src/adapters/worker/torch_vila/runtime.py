"""Loads a VILA checkpoint into the two model ports (text generator and vision encoder)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint, load_state_dict
from vilaserve.adapters.worker.torch_vila.device import resolve_device, resolve_dtype
from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.fast_linear import accelerate_cpu_linears
from vilaserve.adapters.worker.torch_vila.image_cache import ImageEmbeddingCache
from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    compress_tied_embeddings,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama, LlamaArgs
from vilaserve.adapters.worker.torch_vila.model_runner import TorchModelRunner
from vilaserve.adapters.worker.torch_vila.tokenization import load_tokenizer, stop_token_ids
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
    image_cache_mb: int = 256  # projected embeddings of recent images (0: no cache)
    kv_slots: int = 16  # KV-cache rows: running sequences plus prefixes kept for reuse
    max_model_len: int | None = None  # positions per KV row (None: the model's context)


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
        if options.precision not in ("W16A16", "W4A16"):
            raise ValueError(f"--precision {options.precision}: expected W16A16 or W4A16")
        if options.embedding_bits not in (8, 16):
            raise ValueError(f"--embedding-bits {options.embedding_bits}: expected 8 or 16")
        started = time.perf_counter()
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        checkpoint = VilaCheckpoint.open(options.model_path)
        tokenizer = load_tokenizer(checkpoint.llm_dir)
        if options.precision == "W4A16":
            # Imported here: the 16-bit path needs none of the AWQ machinery.
            from vilaserve.adapters.worker.awq.loading import load_awq_llm
            from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16

            model = load_awq_llm(checkpoint, options.quant_path, dtype, device)
            model.fuse_projections(fuse_w4a16)
            if options.embedding_bits == 8:
                compress_token_embeddings(model)
                compress_tied_embeddings(model)
        else:
            from vilaserve.adapters.worker.awq.loading import is_awq_config

            if is_awq_config(checkpoint.llm_config) and options.quant_path is None:
                raise ValueError(
                    f"{checkpoint.llm_dir} is a 4-bit AWQ checkpoint (quantization_config "
                    "quant_method 'awq'): load it with --precision W4A16"
                )
            model = load_llm(checkpoint, dtype, device)
        fast_linears = accelerate_cpu_linears(model) if device.type == "cpu" else 0
        compute_path = cpu_kernels.cpu_path() if device.type == "cpu" else device.type
        template = pick_template(checkpoint.llm_config, tokenizer, options.conv_template)
        stop_ids = template_stop_ids(tokenizer, template)
        runner = TorchModelRunner(
            model,
            tokenizer,
            template.with_stop_token_ids(sorted(stop_ids)),
            executor,
            context_length(checkpoint.llm_config),
            sorted(stop_ids),
            image_wrap(checkpoint, tokenizer),
            compute_path,
            num_slots=options.kv_slots,
            slot_length=options.max_model_len,
        )
        vision = None
        if checkpoint.is_multimodal:
            pipeline = VisionPipeline.from_checkpoint(
                checkpoint.root, checkpoint.config, dtype, device
            )
            cache = None
            if options.image_cache_mb > 0:
                preprocessing = repr(
                    (pipeline.preprocessor.config, pipeline.preprocessor.aspect_ratio)
                )
                cache = ImageEmbeddingCache(options.image_cache_mb * 2**20, preprocessing)
            vision = TorchVisionEncoder(
                pipeline, executor, options.max_image_pixels, cache, options.max_request_pixels
            )
        log.info(
            "model loaded",
            extra={
                "path": str(checkpoint.root),
                "precision": options.precision,
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "template": template.name,
                "multimodal": vision is not None,
                "tokens_per_image": vision.tokens_per_image if vision else 0,
                "compute_path": compute_path,
                "cpu_kernel_linears": fast_linears,
                "kv_slots": runner.num_slots,
                "kv_slot_length": runner.slot_length,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        return cls(checkpoint, runner, vision, executor)


def load_llm(checkpoint: VilaCheckpoint, dtype: torch.dtype, device: torch.device) -> Llama:
    model = Llama.empty(LlamaArgs.from_hf_config(checkpoint.llm_config), dtype, device)
    model.load_hf_state_dict(load_state_dict(checkpoint.llm_dir))
    return model.eval().requires_grad_(False)


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
    """VILA truncates at `tokenizer_model_max_length`; otherwise the position limit."""
    limit = llm_config.get("tokenizer_model_max_length") or llm_config["max_position_embeddings"]
    return int(min(limit, llm_config.get("max_position_embeddings", limit)))


def pick_template(
    llm_config: dict[str, Any], tokenizer: Any, override: str | None
) -> ConversationTemplate:
    shape = LlmShape(
        vocab_size=int(llm_config["vocab_size"]),
        num_layers=int(llm_config["num_hidden_layers"]),
        num_heads=int(llm_config["num_attention_heads"]),
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
