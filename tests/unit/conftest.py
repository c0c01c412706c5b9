from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dependency_injector import providers
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
# Starlette's test client calls every service "testserver": a name the worker and the controller
# (bound to loopback) answer to only when told (their Host check, internal_access.py).
os.environ.setdefault("VILASERVE_ALLOWED_HOSTS", "testserver")
os.environ.setdefault("VILASERVE_CONTROLLER_ALLOWED_HOSTS", "testserver")

from fakes import FakeConstraintCompiler, FakeController, FakeTextGenerator, FakeVisionEncoder

from vilaserve.entrypoints.worker.app import create_worker_app
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings


@pytest.fixture
def generator() -> FakeTextGenerator:
    return FakeTextGenerator()


@pytest.fixture
def vision() -> FakeVisionEncoder:
    return FakeVisionEncoder()


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
def container(
    generator: FakeTextGenerator, vision: FakeVisionEncoder, controller: FakeController
) -> Iterator[WorkerContainer]:
    settings = WorkerSettings(
        model_path="/models/VILA1.5-3b", register_with_controller=False, log_format="text"
    )
    container = WorkerContainer(settings=settings)
    container.text_generator.override(providers.Object(generator))
    container.vision_encoder.override(providers.Object(vision))
    container.constraint_compiler.override(providers.Object(FakeConstraintCompiler()))
    container.controller_client.override(providers.Object(controller))
    yield container


@pytest.fixture
def client(container: WorkerContainer) -> Iterator[TestClient]:
    with TestClient(create_worker_app(container)) as test_client:
        yield test_client
