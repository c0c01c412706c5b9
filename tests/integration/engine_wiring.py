"""The worker's text generator over a loaded runtime, wired as the container wires it."""

from __future__ import annotations

from typing import Any

from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator


def engine_generator(runtime: Any, **config: Any) -> EngineTextGenerator:
    return EngineTextGenerator(Engine(runtime.model_runner, SchedulerConfig(**config)))
