"""deploy/kuberay/rayservice.yaml against KubeRay's RayService CRD and our Ray Serve application.

The CRD's schema is too large to commit (1 MB), so `data/rayservice_crd_fields.json` keeps the
part the manifest reaches: at every object it touches, all the property names the CRD allows
there (the pod template's too: the CRD embeds Kubernetes' pod spec, so a misspelt `volumeMount`
is caught like a misspelt `rayStartParams`), each value's type, and where it came from
(kuberay commit and path). `data/extract_rayservice_crd_fields.py` regenerates it. The
top-level `metadata` is left to the API server (the CRD declares it a bare object).

serveConfigV2 is Ray Serve's config in a string: it must parse, name our application builder
and give it arguments the builder takes; with Ray installed, Ray Serve's own schema checks it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
FIXTURE = Path(__file__).parent / "data" / "rayservice_crd_fields.json"

SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "int-or-string": (int, str),
}


def schema_errors(value: Any, node: dict[str, Any] | None, path: str) -> list[str]:
    """What in `value` the CRD's schema `node` does not allow, one line per finding."""
    if node is None:
        return [f"{path}: allowed by the CRD but not in the fixture; rerun its extractor"]
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        if not isinstance(value, dict):
            return [f"{path}: an object expected, got {value!r}"]
        return _object_errors(value, node, path)
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: a list expected, got {value!r}"]
        return [
            e
            for i, item in enumerate(value)
            for e in schema_errors(item, node["items"], f"{path}[{i}]")
        ]
    return _scalar_errors(value, node, path)


def _object_errors(value: dict[str, Any], node: dict[str, Any], path: str) -> list[str]:
    errors = [
        f"{path}: required field {name!r} missing"
        for name in node.get("required", [])
        if name not in value
    ]
    properties = node.get("properties")
    for key, child in value.items():
        where = f"{path}.{key}"
        if properties is not None and key in properties:
            errors += schema_errors(child, properties[key], where)
        elif "values" in node:
            errors += schema_errors(child, node["values"], where)
        elif not node.get("free_form"):
            errors.append(
                f"{where}: not a field of the CRD here (known: {sorted(properties or [])})"
            )
    return errors


def _scalar_errors(value: Any, node: dict[str, Any], path: str) -> list[str]:
    kind = node.get("type")
    allowed = SCALAR_TYPES.get(kind or "")
    # bool is an int to Python, never to Kubernetes
    if allowed is not None and (
        not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
    ):
        return [f"{path}: a {kind} expected, got {value!r}"]
    if "enum" in node and value not in node["enum"]:
        return [f"{path}: {value!r} is not one of {node['enum']}"]
    if "pattern" in node and isinstance(value, str) and not re.search(node["pattern"], value):
        return [f"{path}: {value!r} does not match {node['pattern']}"]
    return []


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def crd() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def serve_config(document: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(document["spec"]["serveConfigV2"])


def worker_group(document: dict[str, Any]) -> dict[str, Any]:
    (group,) = document["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def the_application(document: dict[str, Any]) -> dict[str, Any]:
    (application,) = serve_config(document)["applications"]
    return application


def cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("4", "500m", 2) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_the_fixture_comes_from_the_crd_of_the_manifests_kind() -> None:
    source, document = crd()["source"], manifest()
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
    assert source["path"] == "ray-operator/config/crd/bases/ray.io_rayservices.yaml"
    assert (document["apiVersion"], document["kind"]) == (source["version"], source["kind"])


def test_every_field_of_the_manifest_is_in_the_crd_schema() -> None:
    errors = schema_errors(manifest(), crd()["schema"], "")
    assert not errors, "\n".join(errors)


def _dig(document: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    found: Any = document
    for step in path:
        found = found[step]
    return found


def _rename(document: dict[str, Any], path: tuple[str | int, ...], old: str, new: str) -> None:
    parent = _dig(document, path)
    parent[new] = parent.pop(old)


WORKER_POD = ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec")
WORKER_CONTAINER = (*WORKER_POD, "containers", 0)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (
            lambda d: _rename(d, ("spec",), "serveConfigV2", "serveConfig"),
            ".spec.serveConfig: not a field",
        ),
        (
            lambda d: _rename(
                d, ("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParams", "rayStartParam"
            ),
            ".spec.rayClusterConfig.headGroupSpec.rayStartParam: not a field",
        ),
        (
            lambda d: _rename(d, WORKER_CONTAINER, "volumeMounts", "volumeMount"),
            "containers[0].volumeMount: not a field",
        ),
        (
            lambda d: _rename(
                d, ("spec", "rayClusterConfig", "workerGroupSpecs", 0), "groupName", "name"
            ),
            "workerGroupSpecs[0]: required field 'groupName' missing",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update(
                {"num-cpus": 0}
            ),
            ".headGroupSpec.rayStartParams.num-cpus: a string expected",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling="yes"),
            ".enableInTreeAutoscaling: a boolean expected",
        ),
        (
            lambda d: _dig(d, (*WORKER_CONTAINER, "resources", "limits")).update(memory="16 GB"),
            ".resources.limits.memory: '16 GB' does not match",
        ),
    ],
    ids=[
        "spec key",
        "head group key",
        "container key",
        "required key",
        "string map",
        "boolean",
        "quantity",
    ],
)
def test_a_mistake_in_the_manifest_is_reported_where_it_is(break_it: Any, expected: str) -> None:
    document = deepcopy(manifest())
    break_it(document)
    errors = schema_errors(document, crd()["schema"], "")
    assert any(expected in error for error in errors), errors


def test_serve_config_deploys_our_builder_at_the_root() -> None:
    application = the_application(manifest())
    assert application["import_path"] == "vilaserve.entrypoints.ray.app:build_app"
    # The API ingress answers every path (the chat at /, the API at /v1) on the serve Service.
    assert application["route_prefix"] == "/"
    assert serve_config(manifest())["http_options"]["port"] == 8000


def test_serve_config_args_are_the_builders_options() -> None:
    from vilaserve.entrypoints.ray.options import fleet_options

    args = the_application(manifest())["args"]
    options = fleet_options(args)  # raises ValueError naming an argument it does not take
    assert options.worker["model_path"] == args["model_path"]
    with pytest.raises(ValueError, match="replica_cpu"):
        fleet_options({**args, "replica_cpu": 3})


def test_the_replicas_fit_the_worker_pods_and_find_the_checkpoint() -> None:
    from vilaserve.entrypoints.ray.options import fleet_options

    document = manifest()
    options = fleet_options(the_application(document)["args"])
    group = worker_group(document)
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    pod_cpus, pod_gpus = cpus(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0))
    assert 0 < options.replica_cpus <= pod_cpus, "a replica must fit a worker pod's CPUs"
    assert options.replica_gpus <= pod_gpus, "a replica must fit a worker pod's GPUs"
    per_pod = int(pod_cpus // options.replica_cpus)
    wanted = options.max_replicas if options.autoscaling else options.replicas
    assert group["maxReplicas"] * per_pod >= wanted, "the worker pods cannot hold every replica"
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
    model_path = options.worker["model_path"]
    assert any(model_path.startswith(m) for m in mounts), f"{model_path} is on no volume: {mounts}"


def test_the_builder_imports_and_builds_the_application_from_the_args() -> None:
    pytest.importorskip("ray", reason="Ray Serve is an extra: pip install -e '.[ray]'")
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    config = serve_config(manifest())
    ServeDeploySchema.model_validate(config)  # Ray Serve's own check of the values
    # ... which ignores unknown keys: a misspelt `route_prefix` would pass it unseen.
    unknown = set(config) - set(ServeDeploySchema.model_fields)
    unknown |= set(config.get("http_options", {})) - set(HTTPOptionsSchema.model_fields)
    application = the_application(manifest())
    unknown |= set(application) - set(ServeApplicationSchema.model_fields)
    assert not unknown, f"not fields of Ray Serve's config: {sorted(unknown)}"
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert len(inspect.signature(builder).parameters) == 1  # Serve passes `args` as one dict
    assert builder(application["args"]) is not None
