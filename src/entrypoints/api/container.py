"""The API server's composition root. Unit tests override `model_directory`, `worker_gateway`
and `image_fetcher` with fakes.

The workers are reached through the controller (HTTP) unless a `worker_fleet` is given: then
through the Ray Serve deployment it names (`vilaserve serve --ray`, entrypoints/ray)."""

from __future__ import annotations

from dependency_injector import containers, providers

from vilaserve.adapters.api.model_directory import HttpModelDirectory
from vilaserve.adapters.api.prometheus_metrics import PrometheusMetrics
from vilaserve.adapters.api.ray_fleet.fleet import RayFleet, RayModelDirectory, RayWorkerGateway
from vilaserve.adapters.api.remote_images import HttpImageFetcher
from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
from vilaserve.adapters.shared.worker_client import HttpWorkerClient
from vilaserve.application.api.completion_relay import Admission, CompletionRelay
from vilaserve.application.api.image_inputs import ImageResolver
from vilaserve.application.api.metrics import ApiMetrics
from vilaserve.application.api.model_router import ModelRouter
from vilaserve.application.api.use_cases import ChatCompletion, Completion, ListModels
from vilaserve.domain.api.ports import ModelDirectory
from vilaserve.domain.api.remote_images import RemoteImagePolicy
from vilaserve.domain.shared.worker_gateway import WorkerGateway
from vilaserve.entrypoints.api.settings import ApiSettings


def _image_fetcher(settings: ApiSettings) -> HttpImageFetcher | None:
    if not settings.allow_remote_images:
        return None  # remote URLs are refused with a 400 that says how to enable them
    policy = RemoteImagePolicy(
        domains=settings.image_domain_list,
        timeout_s=settings.image_fetch_timeout_s,
        max_bytes=settings.max_remote_image_bytes,
        allow_private=settings.allow_private_image_hosts,
    )
    return HttpImageFetcher(policy)


def _worker_gateway(settings: ApiSettings, fleet: RayFleet | None) -> WorkerGateway:
    if fleet is not None:
        return RayWorkerGateway(fleet, timeout_s=settings.worker_timeout_s)
    return HttpWorkerClient(
        timeout_s=settings.worker_timeout_s, internal_token=settings.internal_token
    )


def _model_directory(settings: ApiSettings, fleet: RayFleet | None) -> ModelDirectory:
    if fleet is not None:
        return RayModelDirectory(fleet)
    return HttpModelDirectory(
        controller_address=settings.controller_address,
        timeout_s=settings.controller_timeout_s,
        internal_token=settings.internal_token,
    )


class ApiContainer(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=ApiSettings)
    # Ray Serve replicas to send the requests to, instead of the controller's workers.
    worker_fleet = providers.Object(None)

    worker_gateway = providers.Singleton(_worker_gateway, settings, worker_fleet)
    model_directory = providers.Singleton(_model_directory, settings, worker_fleet)
    image_fetcher = providers.Singleton(_image_fetcher, settings)
    chat_template_renderer = providers.Singleton(JinjaChatTemplateRenderer)

    metrics = providers.Singleton(ApiMetrics, registry=providers.Factory(PrometheusMetrics))
    admission = providers.Singleton(Admission, limit=settings.provided.max_concurrent_requests)
    router = providers.Singleton(
        ModelRouter,
        directory=model_directory,
        gateway=worker_gateway,
        address_ttl_s=settings.provided.worker_address_ttl_s,
        info_ttl_s=settings.provided.model_info_ttl_s,
    )
    images = providers.Singleton(
        ImageResolver, fetcher=image_fetcher, max_image_bytes=settings.provided.max_image_bytes
    )
    relay = providers.Singleton(
        CompletionRelay,
        router=router,
        gateway=worker_gateway,
        metrics=metrics,
        admission=admission,
    )
    chat_completion = providers.Singleton(
        ChatCompletion,
        router=router,
        relay=relay,
        images=images,
        renderer=chat_template_renderer,
    )
    completion = providers.Singleton(Completion, router=router, relay=relay)
    list_models = providers.Singleton(ListModels, router=router)
