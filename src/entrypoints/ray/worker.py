"""What a Ray Serve replica loads: the worker's container, as `vilaserve worker` builds it, with
no controller to register with (Ray Serve keeps the fleet)."""

from __future__ import annotations

from typing import Any

from vilaserve.adapters.worker.ray_replica import ReplicaServices
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings


def worker_settings(fields: dict[str, Any]) -> WorkerSettings:
    """The worker's settings: `fields` over the replica's `VILASERVE_*` environment."""
    return WorkerSettings(**{**fields, "register_with_controller": False})


def build_replica_services(fields: dict[str, Any]) -> ReplicaServices:
    """Loads the model in this process and returns the use cases the worker's routes call."""
    settings = worker_settings(fields)
    container = WorkerContainer(settings=settings)
    return ReplicaServices(
        generate=container.generate_stream(),
        describe=container.describe_model(),
        report_status=container.report_status(),
        generator=container.text_generator(),
        runner=container.runtime().model_runner,
        render_metrics=lambda: container.engine_observer().render().decode(),
    )
