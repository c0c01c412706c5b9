"""JSON Schemas from clients (`response_format`, `guided_json`, a tool's `parameters`), checked
before any generation so that a malformed one is a 400 naming its parameter.

The check is against the JSON Schema 2020-12 meta-schema (the `jsonschema` package), without
its format checks: a `pattern` is judged by the worker's grammar compiler, whose regex dialect is
not Python's. What the meta-schema allows but the worker's compiler does not support comes back
from the worker as its own 400.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from vilaserve.domain.api.errors import BadRequest

JsonSchema = dict[str, Any]


def schema_from(value: Any, param: str) -> JsonSchema:
    """A schema given as an object or as a string holding one; raises `BadRequest`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{param} must be a JSON Schema object", param=param)
    check_schema(value, param)
    return value


def check_schema(schema: JsonSchema, param: str) -> None:
    try:
        Draft202012Validator.check_schema(schema, format_checker=None)
    except SchemaError as exc:
        where = exc.json_path if exc.json_path != "$" else "the schema"
        raise BadRequest(
            f"{param} is not a valid JSON Schema: {where}: {exc.message}", param=param
        ) from None
    except RecursionError:
        raise BadRequest(f"{param} is nested too deeply", param=param) from None


def check_object_schema(schema: JsonSchema, param: str) -> None:
    """A tool's `parameters`: a valid schema whose instances are JSON objects."""
    check_schema(schema, param)
    kind = schema.get("type")
    if kind != "object":
        raise BadRequest(
            f"{param} must be a JSON Schema of type 'object' (the function's named arguments), "
            f"got type {kind!r}",
            param=param,
        )
