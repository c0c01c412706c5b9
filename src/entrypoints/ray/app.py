"""The Ray Serve application: worker replicas, and for a cluster of its own (KubeRay) the
OpenAI API and web chat in front of them.

`build_app` is the application builder a Serve config or a KubeRay `RayService` names as
`import_path: vilaserve.entrypoints.ray.app:build_app`; its `args` are the fleet's options
(options.py): `model_path` (required), `model_name`, `quant_path`, `vision_tower`, `precision`,
`device`, `dtype`, `conv_template`; `replicas`, or `min_replicas`/`max_replicas` with
`target_ongoing_requests`, `upscale_delay_s`, `downscale_delay_s`; `replica_cpus`,
`replica_gpus`, `max_ongoing_requests`, `cache_aware`, `health_check_period_s`, `api_cpus`
(the API's deployment, default 0.5), `look_back_period_s`. The API reads
its settings (keys, limits) from its `VILASERVE_API_*` environment, as `vilaserve api` does.

`vilaserve serve --ray` deploys only `worker_application` and serves the API itself (runner.py).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from vilaserve.adapters.api.ray_fleet.fleet import RayFleet, fleet_address
from vilaserve.adapters.api.ray_fleet.request_router import ConversationAffinityRouter
from vilaserve.adapters.worker.ray_replica import WorkerReplica
from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.ray.options import (
    API_DEPLOYMENT,
    APP_NAME,
    WORKER_DEPLOYMENT,
    FleetOptions,
    fleet_options,
)
from vilaserve.entrypoints.ray.worker import build_replica_services


def worker_application(options: FleetOptions) -> Application:
    """The replicas, each one loading the model once, routed by conversation when
    `options.cache_aware` (by the power of two choices otherwise)."""
    router = (
        RequestRouterConfig(request_router_class=ConversationAffinityRouter)
        if options.cache_aware
        else None
    )
    scaling = options.autoscaling_config()
    deployment = serve.deployment(
        WorkerReplica,
        name=WORKER_DEPLOYMENT,
        num_replicas=None if scaling else options.replicas,
        autoscaling_config=scaling,
        ray_actor_options=options.ray_actor_options(),
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=options.health_check_period_s,
        **({"request_router_config": router} if router is not None else {}),
    )
    return deployment.bind(build_replica_services, dict(options.worker))


def ray_fleet(handle: Any, options: FleetOptions, app_name: str = APP_NAME) -> RayFleet:
    return RayFleet(
        handle=handle,
        address=fleet_address(app_name, WORKER_DEPLOYMENT),
        model_names=(options.model_name,),
        cache_aware=options.cache_aware,
    )


def api_container(fleet: RayFleet, settings: ApiSettings) -> ApiContainer:
    """The API's container with the Ray adapters in place of the controller's."""
    return ApiContainer(settings=settings, worker_fleet=fleet)


@serve.ingress()
class ApiIngress:
    """The API and web chat as a Ray Serve deployment, in front of the worker replicas."""

    def __init__(self, workers: Any, options: FleetOptions) -> None:
        app_name = serve.get_replica_context().app_name
        self._fleet = ray_fleet(workers, options, app_name)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api_app(api_container(self._fleet, ApiSettings()))


def build_app(args: dict[str, Any]) -> Application:
    """The whole service as one Ray Serve application (see the module's docstring)."""
    options = fleet_options(args)
    api = serve.deployment(
        ApiIngress, name=API_DEPLOYMENT, ray_actor_options={"num_cpus": options.api_cpus}
    )
    return api.bind(worker_application(options), options)
