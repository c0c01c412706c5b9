"""The JSON request bodies of the worker protocol and the controller protocol, for the OpenAPI
schemas only.

The routes read their bodies themselves (bounded in size and depth, errors in the protocol's
own shape), so FastAPI sees no body parameter; these declarations, given as `openapi_extra`,
describe what the parsers in `vilaserve.domain.shared` accept. They change no behaviour: FastAPI
does not validate against `openapi_extra`, the parsers do.
"""

from __future__ import annotations

from typing import Any

_SEED_LIMIT = 2**63
_STRINGS: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}},
    ]
}

# vLLM's names: exactly one kind of constraint on the answer (the worker compiles it).
_STRUCTURED_OUTPUTS: dict[str, Any] = {
    "type": "object",
    "description": "holds the answer to one constraint: a JSON schema (`json`), any JSON object "
    "(`json_object`), a regular expression, a choice among strings, or a Lark grammar "
    "(llguidance's dialect)",
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
    "properties": {
        "json": {"anyOf": [{"type": "object"}, {"type": "string"}]},
        "json_object": {"type": "boolean", "enum": [True]},
        "regex": {"type": "string"},
        "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "grammar": {"type": "string"},
    },
}

GENERATION_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "GenerationRequest",
    "description": "TinyChat / LLaVA / FastChat worker request; `images` are base64 pictures, "
    "one per `<image>` placeholder of the prompt.",
    "required": ["prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "images": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "max_new_tokens": {"type": "integer", "minimum": 1},
        "stop": _STRINGS,
        "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
        "seed": {"type": "integer", "minimum": -_SEED_LIMIT, "maximum": _SEED_LIMIT - 1},
        "echo": {"type": "boolean"},
        "request_id": {"type": "string"},
        "ignore_eos": {"type": "boolean"},
        "structured_outputs": _STRUCTURED_OUTPUTS,
    },
}

# The controller dispatches on `model`, so its relay needs it.
ROUTED_GENERATION_REQUEST: dict[str, Any] = {
    **GENERATION_REQUEST,
    "title": "RoutedGenerationRequest",
    "required": ["model", "prompt"],
    "properties": {**GENERATION_REQUEST["properties"], "model": {"type": "string", "minLength": 1}},
}

COUNT_TOKEN_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "CountTokenRequest",
    "required": ["prompt"],
    "properties": {"prompt": {"type": "string"}},
}

_WORKER_NAME: dict[str, Any] = {
    "type": "string",
    "description": "the worker's bare http(s)://host:port (no path, query or user info)",
    "pattern": r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$",
}

WORKER_STATUS: dict[str, Any] = {
    "type": "object",
    "title": "WorkerStatus",
    "required": ["model_names"],
    "properties": {
        "model_names": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "speed": {"type": "number", "minimum": 0},
        "queue_length": {"type": "integer", "minimum": 0},
    },
}

REGISTRATION: dict[str, Any] = {
    "type": "object",
    "title": "Registration",
    "required": ["worker_name"],
    "properties": {
        "worker_name": _WORKER_NAME,
        "check_heart_beat": {"type": "boolean"},
        "worker_status": WORKER_STATUS,
        "multimodal": {"type": "boolean"},
    },
}

HEARTBEAT: dict[str, Any] = {
    "type": "object",
    "title": "Heartbeat",
    "required": ["worker_name"],
    "properties": {
        "worker_name": _WORKER_NAME,
        "queue_length": {"type": "integer", "minimum": 0},
        "leaving": {"type": "boolean"},
    },
}

MODEL_LOOKUP: dict[str, Any] = {
    "type": "object",
    "title": "ModelLookup",
    "required": ["model"],
    "properties": {"model": {"type": "string", "minLength": 1}},
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring a required `application/json` body of `schema`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place (the models are not recursive),
    so that it stands alone inside an OpenAPI document. Discriminator mappings (which name
    `$defs` entries) are dropped: the `oneOf` branches tell themselves apart by their `const`."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k not in ("$defs", "discriminator")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
