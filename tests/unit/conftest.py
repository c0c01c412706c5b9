from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dependency_injector import providers
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))

from fakes import PNG_MAGIC, FakeController, FakeTextGenerator, FakeVisionEncoder  # noqa: E402

from vilaserve.entrypoints.container import WorkerContainer  # noqa: E402
from vilaserve.entrypoints.http.worker_app import create_worker_app  # noqa: E402
from vilaserve.entrypoints.settings import WorkerSettings  # noqa: E402

FAKE_PNG_B64 = base64.b64encode(PNG_MAGIC + b"fake image body").decode()


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
    container.controller_client.override(providers.Object(controller))
    yield container
    container.unwire()


@pytest.fixture
def client(container: WorkerContainer) -> Iterator[TestClient]:
    with TestClient(create_worker_app(container)) as test_client:
        yield test_client
