"""What a request asks its answer to match, in every spelling clients use, as the one constraint
the worker applies (`structured_outputs` of the worker protocol).

- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: one of `json`, `json_object`, `regex`, `choice`, `grammar` (a Lark
  grammar in llguidance's dialect);
- vLLM's older top-level names `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

A request carries at most one constraint; two (in whatever spellings) are a 400 naming both.
Schemas are checked here (`json_schemas`); regexes and grammars only by the worker's compiler,
whose refusal comes back as a 400 too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.json_schemas import schema_from

ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint as the worker protocol's `structured_outputs` object carries it."""

    kind: ConstraintKind
    value: Any  # a schema (dict), True, a regex, a tuple of choices, a grammar

    def to_payload(self) -> dict[str, Any]:
        value = list(self.value) if self.kind == "choice" else self.value
        return {self.kind: value}


ANY_JSON_OBJECT = StructuredOutput("json_object", True)

# A named constraint: the request parameter that asked for it, and what it asks.
Requested = tuple[str, StructuredOutput]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextFormat(_Lenient):
    type: Literal["text"]


class JsonObjectFormat(_Lenient):
    type: Literal["json_object"]


class JsonSchemaSpec(_Lenient):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    # `schema` would shadow pydantic's own attribute of that name.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # every answer is held to the schema, strict or not


class JsonSchemaFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class StructuredOutputsParams(_Lenient):
    """vLLM's `structured_outputs` (StructuredOutputsParams); its other options (whitespace,
    backends) are accepted and have no effect here."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    structural_tag: Any = None


def from_response_format(
    value: TextFormat | JsonObjectFormat | JsonSchemaFormat,
) -> list[Requested]:
    if isinstance(value, JsonObjectFormat):
        return [("response_format", ANY_JSON_OBJECT)]
    if isinstance(value, JsonSchemaFormat):
        spec = value.json_schema.json_schema
        if spec is None:  # OpenAI allows a named format without a schema: any JSON object
            return [("response_format", ANY_JSON_OBJECT)]
        schema = schema_from(spec, "response_format.json_schema.schema")
        return [("response_format", StructuredOutput("json", schema))]
    return []


def from_structured_outputs(params: StructuredOutputsParams) -> list[Requested]:
    if params.structural_tag is not None:
        raise BadRequest(
            "structured_outputs.structural_tag is not supported by this server; use json, "
            "regex, choice or grammar",
            param="structured_outputs.structural_tag",
        )
    found: list[Requested] = []
    if params.json_schema is not None:
        schema = schema_from(params.json_schema, "structured_outputs.json")
        found.append(("structured_outputs.json", StructuredOutput("json", schema)))
    if params.json_object:
        found.append(("structured_outputs.json_object", ANY_JSON_OBJECT))
    if params.regex is not None:
        found.append(("structured_outputs.regex", StructuredOutput("regex", params.regex)))
    if params.choice is not None:
        choices = tuple(params.choice)
        found.append(("structured_outputs.choice", StructuredOutput("choice", choices)))
    if params.grammar is not None:
        found.append(("structured_outputs.grammar", StructuredOutput("grammar", params.grammar)))
    return found


def from_guided_fields(
    guided_json: dict[str, Any] | str | None,
    guided_regex: str | None,
    guided_choice: list[str] | None,
    guided_grammar: str | None,
) -> list[Requested]:
    found: list[Requested] = []
    if guided_json is not None:
        schema = schema_from(guided_json, "guided_json")
        found.append(("guided_json", StructuredOutput("json", schema)))
    if guided_regex is not None:
        found.append(("guided_regex", StructuredOutput("regex", guided_regex)))
    if guided_choice is not None:
        found.append(("guided_choice", StructuredOutput("choice", tuple(guided_choice))))
    if guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput("grammar", guided_grammar)))
    return found


def the_one_constraint(requested: list[Requested]) -> Requested | None:
    """The request's constraint; `BadRequest` naming both when there are two or more."""
    if len(requested) > 1:
        names = " and ".join(f"'{param}'" for param, _ in requested[:2])
        raise BadRequest(
            f"a request may constrain its answer once; {names} both do", param=requested[1][0]
        )
    return requested[0] if requested else None
