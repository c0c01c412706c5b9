"""How the worker fleet is deployed: the options `vilaserve serve --ray` takes as flags and the
application builder (`build_app`) takes as its `args`, checked once, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vilaserve.domain.worker.naming import derive_model_name

APP_NAME = "vilaserve"
WORKER_DEPLOYMENT = "VilaWorker"
API_DEPLOYMENT = "VilaApi"

# The worker's own settings a replica is built with (WorkerSettings' names); anything else a
# replica needs comes from its `VILASERVE_*` environment (runtime_env), as for `vilaserve worker`.
WORKER_FIELDS = (
    "model_path",
    "model_name",
    "quant_path",
    "vision_tower",
    "precision",
    "device",
    "dtype",
    "conv_template",
)


@dataclass(frozen=True)
class FleetOptions:
    """The replicas: how many (fixed, or between `min_replicas` and `max_replicas` with Ray
    Serve's autoscaling on ongoing requests per replica), and what each one holds."""

    worker: Mapping[str, Any] = field(default_factory=dict)  # WORKER_FIELDS that were given
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # the window the ongoing requests are averaged over
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # Requests a replica holds at once (the worker's default --limit-model-concurrency); more
    # wait in Ray Serve's queue, where a new or idle replica can take them.
    max_ongoing_requests: int = 8
    cache_aware: bool = True  # route turn 2 of a conversation to turn 1's replica
    health_check_period_s: float = 10.0
    api_cpus: float = 0.5  # build_app only: the API's own deployment (serve --ray runs it here)

    def __post_init__(self) -> None:
        if not self.worker.get("model_path"):
            raise ValueError("model_path is required")
        if self.replicas < 1:
            raise ValueError(f"replicas must be 1 or more, not {self.replicas}")
        if self.autoscaling:
            low, high = self.min_replicas or 0, self.max_replicas or 0
            if low < 0 or high < max(low, 1):
                raise ValueError(
                    f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                    f"not {self.min_replicas} and {self.max_replicas}"
                )
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica_cpus and replica_gpus must be 0 or more")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def model_name(self) -> str:
        """The name the replicas serve under, as the worker derives it."""
        return derive_model_name(
            str(self.worker["model_path"]),
            str(self.worker.get("precision") or "W16A16"),
            self.worker.get("model_name"),
        )

    def autoscaling_config(self) -> dict[str, Any] | None:
        if not self.autoscaling:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }

    def ray_actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus}


_NUMBERS = {
    f.name: f.type
    for f in fields(FleetOptions)
    if f.name not in ("worker", "cache_aware", "min_replicas", "max_replicas")
}


def fleet_options(args: Mapping[str, Any]) -> FleetOptions:
    """Options from a builder's `args` (strings in a YAML config are fine). Raises ValueError
    naming the first argument that is not understood or not valid."""
    unknown = set(args) - set(WORKER_FIELDS) - {f.name for f in fields(FleetOptions)}
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    worker = {k: args[k] for k in WORKER_FIELDS if args.get(k) not in (None, "")}
    given: dict[str, Any] = {}
    for name, kind in _NUMBERS.items():
        if args.get(name) is not None:
            given[name] = _number(name, args[name], int if kind in ("int", int) else float)
    for name in ("min_replicas", "max_replicas"):
        if args.get(name) is not None:
            given[name] = _number(name, args[name], int)
    if args.get("cache_aware") is not None:
        given["cache_aware"] = _flag(args["cache_aware"])
    return FleetOptions(worker=worker, **given)


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {value!r} is not a number") from exc


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
