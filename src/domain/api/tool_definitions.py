"""The functions a chat request offers (`tools`), which of them the model may or must call
(`tool_choice`, `parallel_tool_calls`), checked into a `ToolPolicy`.

`tool_choice`: "none" (tools are not offered and nothing is constrained), "auto" (the default
with tools: text or calls), "required" (at least one call), or
`{"type": "function", "function": {"name": ...}}` (one call of that function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.json_schemas import JsonSchema, check_object_schema

# OpenAI's rule for function names; it also keeps them plain inside prompts and grammars.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# What a function without `parameters` takes: no arguments, written as an empty object.
NO_PARAMETERS: JsonSchema = {"type": "object", "properties": {}, "additionalProperties": False}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments are always held to `parameters`


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Lenient):
    name: str = Field(min_length=1)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
TOOL_CHOICE_WORDS = ("none", "auto", "required")


def check_tool_choice_word(value: object) -> object:
    """A word that is not one of the three, told in one sentence (not one per union member)."""
    if isinstance(value, str) and value not in TOOL_CHOICE_WORDS:
        raise ValueError(
            "tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}'
        )
    return value


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: JsonSchema

    def to_openai(self) -> dict[str, Any]:
        """The tool as OpenAI (and Hugging Face chat templates) write it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class ToolPolicy:
    """The tools offered to the model and how it may call them (never for "none")."""

    tools: tuple[FunctionTool, ...]
    mode: Mode
    parallel: bool = True
    forced: str | None = None  # the one function a named tool_choice calls

    @property
    def callable_tools(self) -> tuple[FunctionTool, ...]:
        if self.forced is None:
            return self.tools
        return tuple(t for t in self.tools if t.name == self.forced)

    @property
    def many_calls(self) -> bool:
        """Several calls in one answer: parallel calls, unless one function is named."""
        return self.parallel and self.forced is None


def tool_policy(
    tools: list[ToolDefinition] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
) -> ToolPolicy | None:
    """The policy, or None when no tool may be called; `BadRequest` naming the parameter."""
    if not tools:
        if choice is not None:
            raise BadRequest("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        return None
    checked = tuple(_checked(index, tool.function) for index, tool in enumerate(tools))
    names = [tool.name for tool in checked]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BadRequest(f"tools name the function {repeated[0]!r} twice", param="tools")
    parallel = True if parallel is None else parallel
    if choice is None or choice == "auto":
        return ToolPolicy(checked, "auto", parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolPolicy(checked, "required", parallel)
    name = choice.function.name
    if name not in names:
        raise BadRequest(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(names)})",
            param="tool_choice",
        )
    return ToolPolicy(checked, "named", parallel, forced=name)


def _checked(index: int, function: FunctionDefinition) -> FunctionTool:
    parameters = function.parameters
    if not parameters:  # absent or {}: a function of no arguments
        parameters = NO_PARAMETERS
    else:
        check_object_schema(parameters, f"tools.{index}.function.parameters")
    return FunctionTool(function.name, function.description or "", parameters)
