"""The controller's composition root: the registry, the worker client and the use cases."""

from __future__ import annotations

import random
import time

from dependency_injector import containers, providers

from vilaserve.adapters.shared.worker_client import HttpWorkerClient
from vilaserve.application.controller.proxy_stream import ProxyGenerateStream
from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.domain.controller.worker_registry import DispatchMethod, WorkerRegistry
from vilaserve.entrypoints.controller.settings import ControllerSettings


class ControllerContainer(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=ControllerSettings)

    clock = providers.Object(time.monotonic)
    random_source = providers.Singleton(random.Random)
    worker_gateway = providers.Singleton(
        HttpWorkerClient,
        timeout_s=settings.provided.worker_api_timeout,
        internal_token=settings.provided.internal_token,
    )

    registry = providers.Singleton(
        WorkerRegistry,
        expiration_s=settings.provided.heart_beat_expiration,
        clock=clock,
        rng=random_source,
    )
    directory = providers.Singleton(
        WorkerDirectory,
        registry=registry,
        gateway=worker_gateway,
        dispatch_method=providers.Factory(DispatchMethod, settings.provided.dispatch_method),
        status_timeout_s=settings.provided.worker_status_timeout,
    )
    proxy_stream = providers.Singleton(
        ProxyGenerateStream, directory=directory, gateway=worker_gateway
    )
