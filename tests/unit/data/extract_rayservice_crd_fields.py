"""Regenerates rayservice_crd_fields.json: the part of KubeRay's RayService CRD schema that
deploy/kuberay/rayservice.yaml reaches, so the unit test checks the manifest offline.

    python tests/unit/data/extract_rayservice_crd_fields.py CRD.yaml --commit SHA [--blob SHA]

CRD.yaml is `ray-operator/config/crd/bases/ray.io_rayservices.yaml` of ray-project/kuberay at
SHA. Every object the manifest touches keeps the names of all its properties (so a misspelt or
unknown key is caught), but only the properties the manifest uses are expanded; the others stay
`null`. Run it again whenever the manifest starts using a field the fixture does not expand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
FIXTURE = Path(__file__).with_name("rayservice_crd_fields.json")
CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayservices.yaml"
# What a value may be is all the test checks beside the names; the rest of the schema
# (descriptions, CEL rules, list-map keys) stays behind.
KEPT_SCALAR_KEYWORDS = ("enum", "pattern", "format")


def value_type(schema: dict[str, Any]) -> str | None:
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    return schema.get("type")


def merged(values: list[Any]) -> Any:
    """One value holding every key of `values` (dicts merged deeply, lists joined): the
    schema of a list's items or a map's values is expanded for all of them at once."""
    dicts = [v for v in values if isinstance(v, dict)]
    if dicts:
        keys = {k for d in dicts for k in d}
        return {k: merged([d[k] for d in dicts if k in d]) for k in sorted(keys)}
    lists = [v for v in values if isinstance(v, list)]
    if lists:
        return [merged([item for lst in lists for item in lst])]
    return values[0] if values else None


def prune(schema: dict[str, Any], value: Any) -> dict[str, Any]:
    """The schema node for `value`: its type, its property names, and, expanded, the children
    `value` has."""
    node: dict[str, Any] = {}
    kind = value_type(schema)
    if kind is not None:
        node["type"] = kind
    node.update({k: schema[k] for k in KEPT_SCALAR_KEYWORDS if k in schema})
    if "required" in schema:
        node["required"] = sorted(schema["required"])
    if "properties" in schema:
        used = value if isinstance(value, dict) else {}
        node["properties"] = {
            name: prune(child, used[name]) if name in used else None
            for name, child in sorted(schema["properties"].items())
        }
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        # a map (labels, rayStartParams, resource limits): any key, values of one schema
        entries = list(value.values()) if isinstance(value, dict) else []
        node["values"] = prune(additional, merged(entries))
    elif schema.get("x-kubernetes-preserve-unknown-fields") or (
        kind == "object" and "properties" not in schema
    ):
        node["free_form"] = True
    if "items" in schema:
        node["items"] = prune(schema["items"], merged(value if isinstance(value, list) else []))
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("--commit", required=True, help="the kuberay commit the CRD is from")
    parser.add_argument("--blob", default="", help="the CRD file's git blob id at that commit")
    args = parser.parse_args()

    crd = yaml.safe_load(args.crd.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    manifest = yaml.safe_load(MANIFEST.read_text())
    fixture = {
        "source": {
            "repository": "ray-project/kuberay",
            "commit": args.commit,
            "path": CRD_PATH,
            "blob": args.blob,
            "version": f"{crd['spec']['group']}/{v1['name']}",
            "kind": crd["spec"]["names"]["kind"],
        },
        "generated_by": "tests/unit/data/extract_rayservice_crd_fields.py",
        "schema": prune(v1["schema"]["openAPIV3Schema"], manifest),
    }
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")


if __name__ == "__main__":
    main()
