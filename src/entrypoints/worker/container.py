"""The composition root: the one place that decides which adapter serves which port.

Unit tests override `text_generator`, `vision_encoder`, `constraint_compiler` and
`controller_client` with fakes; the torch adapter is imported lazily inside its factory, so
building the container imports no torch.
"""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from vilaserve.adapters.worker.controller_client import HttpControllerClient
from vilaserve.adapters.worker.engine_metrics import PrometheusEngineObserver
from vilaserve.application.worker.describe_model import DescribeModel
from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator
from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.application.worker.heartbeat import Heartbeat, HeartbeatPolicy, Register
from vilaserve.application.worker.report_status import ReportStatus
from vilaserve.domain.worker.naming import derive_model_name
from vilaserve.entrypoints.worker.settings import WorkerSettings


def _load_runtime(settings: WorkerSettings) -> Any:
    # Imported here so that the container (and every unit test) stays free of torch.
    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions

    return VilaRuntime.load(
        VilaRuntimeOptions(
            model_path=settings.model_path,
            quant_path=settings.quant_path,
            vision_tower=settings.vision_tower,
            precision=settings.precision,
            device=settings.device,
            dtype=settings.dtype,
            conv_template=settings.conv_template,
            max_image_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
            image_cache_mb=settings.image_cache_mb,
            embedding_bits=settings.embedding_bits,
            vision_quantization=settings.quantize_vision_tower,
            kv_slots=settings.cache_rows,
            max_model_len=settings.max_model_len,
            adaptive_threads=settings.adaptive_threads,
        )
    )


def _constraint_compiler(runtime: Any) -> Any:
    """llguidance over the model's tokenizer, its end tokens those that end an answer; built in
    the background (constrained requests that come first wait, the others never do). None
    (requests with `structured_outputs` refused) for a runner that has no tokenizer to read."""
    from vilaserve.adapters.worker.torch_vila.constraints import CompilerBuiltInBackground

    runner = runtime.model_runner
    tokenizer = getattr(runner, "tokenizer", None)
    if tokenizer is None:
        return None
    return CompilerBuiltInBackground(tokenizer, sorted(runner.stop_token_ids))


def _engine_text_generator(settings: WorkerSettings, runtime: Any, observer: Any) -> Any:
    return EngineTextGenerator(
        Engine(
            runtime.model_runner,
            SchedulerConfig(
                max_num_seqs=settings.running_sequences,
                max_requests=settings.max_requests,
                max_in_service=settings.limit_model_concurrency,
                max_num_batched_tokens=max(
                    settings.max_num_batched_tokens, settings.running_sequences
                ),
                prefill_chunk_while_decoding=settings.prefill_chunk,
                max_itl_slowdown=settings.max_itl_slowdown,
            ),
            observer,
        )
    )


def _is_multimodal(settings: WorkerSettings, vision: object | None) -> bool:
    return settings.multi_modal if settings.multi_modal is not None else vision is not None


class WorkerContainer(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=WorkerSettings)

    runtime = providers.Singleton(_load_runtime, settings)
    vision_encoder = providers.Singleton(lambda rt: rt.vision_encoder, runtime)
    engine_observer = providers.Singleton(
        PrometheusEngineObserver,
        image_cache=providers.Callable(lambda v: getattr(v, "cache", None), vision_encoder),
    )
    text_generator = providers.Singleton(_engine_text_generator, settings, runtime, engine_observer)
    constraint_compiler = providers.Singleton(_constraint_compiler, runtime)
    controller_client = providers.Singleton(
        HttpControllerClient,
        controller_address=settings.provided.controller_address,
        secret=settings.provided.registration_secret,
    )

    model_name = providers.Singleton(
        lambda s: derive_model_name(s.model_path, s.precision, s.model_name), settings
    )
    multimodal = providers.Singleton(_is_multimodal, settings, vision_encoder)
    limits = providers.Singleton(
        GenerationLimits,
        max_new_tokens_cap=settings.provided.max_new_tokens_cap,
        stream_interval=settings.provided.stream_interval,
        max_images=settings.provided.max_images,
        max_image_bytes=settings.provided.max_image_bytes,
        max_prompt_chars=settings.provided.max_prompt_chars,
    )

    # The engine's admission queue is the one the status, the heartbeats and /metrics report.
    report_status = providers.Singleton(
        ReportStatus, model_names=providers.List(model_name), generator=text_generator
    )
    describe_model = providers.Singleton(
        DescribeModel,
        model_name=model_name,
        generator=text_generator,
        vision=vision_encoder,
        max_prompt_chars=settings.provided.max_prompt_chars,
    )
    generate_stream = providers.Singleton(
        GenerateStream,
        generator=text_generator,
        vision=vision_encoder,
        limits=limits,
        observer=engine_observer,
        constraints=constraint_compiler,
    )
    register = providers.Singleton(
        Register,
        controller=controller_client,
        worker_address=settings.provided.advertised_address,
        report_status=report_status,
        multimodal=multimodal,
    )
    heartbeat = providers.Singleton(
        Heartbeat,
        controller=controller_client,
        register=register,
        report_status=report_status,
        worker_address=settings.provided.advertised_address,
        policy=providers.Factory(
            HeartbeatPolicy,
            interval_s=settings.provided.heartbeat_interval_s,
            retry_max_s=settings.provided.heartbeat_retry_max_s,
        ),
    )
