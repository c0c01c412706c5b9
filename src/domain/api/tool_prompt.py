"""Tools in the prompt, for templates whose Jinja source does not render them itself: the
tools offered (added to the system message), earlier calls (in the assistant's turn, written
as the model writes them) and their results, in the template's `ToolCallSyntax`.

- `HERMES`: the tools as JSON lines inside `<tools></tools>`; calls as `<tool_call>` blocks;
  each result `<tool_response>\\n...\\n</tool_response>` in a user turn.
- `LLAMA3_JSON`: the tools as JSON lines, with how to call them; a call is the JSON object
  `{"name": ..., "parameters": ...}` (several separated by `; `); each result is an `ipython`
  turn, as Llama 3.1's JSON tool calling has it.
- `GENERIC_JSON`: the tools as JSON lines `{"name", "description", "parameters"}`, with the
  form of an answer that calls them, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`;
  each result a user turn `{"tool_result": {"name": ..., "content": ...}}`, the content as
  JSON when it is JSON, as a string otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vilaserve.domain.api.control_tokens import ControlTokenGuard
from vilaserve.domain.api.tool_definitions import FunctionTool, ToolPolicy
from vilaserve.domain.api.tool_syntax import GENERIC_JSON, HERMES, LLAMA3_JSON, ToolCallSyntax

# The markers of a syntax that a tokenizer may hold as tokens (Qwen2's do): client text must
# not be able to write them when tools are in play.
TOOL_MARKERS = {
    HERMES.name: frozenset(
        f"<{slash}{tag}>" for tag in ("tool_call", "tools", "tool_response") for slash in ("", "/")
    ),
}


def markers_of(syntax: ToolCallSyntax) -> frozenset[str]:
    return TOOL_MARKERS.get(syntax.name, frozenset())


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tools_block(syntax: ToolCallSyntax, policy: ToolPolicy, guard: ControlTokenGuard) -> str:
    """What the system message says about the tools."""
    if syntax.name == HERMES.name:
        lines = [guard.neutralise(compact_json(t.to_openai())) for t in policy.tools]
        body = [
            "# Tools",
            "",
            "You can call functions to help with the request. They are listed inside "
            "<tools></tools>, one JSON object per line:",
            "<tools>",
            *lines,
            "</tools>",
            "",
            "To call a function, write its name and arguments as a JSON object inside "
            "<tool_call></tool_call> tags:",
            HERMES.calls_text([("<function name>", "<arguments as a JSON object>")]),
        ]
    else:
        described = [_plain(t) for t in policy.tools]
        lines = [guard.neutralise(compact_json(d)) for d in described]
        example = syntax.calls_text([("<function name>", "<arguments as a JSON object>")])
        several = f' Separate several calls with "{syntax.separator.strip()}".'
        if syntax.name == GENERIC_JSON.name:
            several = ""  # the list holds them
        body = [
            "You can call these functions (their parameters are JSON Schemas):",
            *lines,
            "",
            f"To call functions, answer with only this JSON and nothing else: {example}"
            + (several if policy.many_calls else ""),
        ]
        if policy.mode == "auto":
            body.append('To answer in words instead, do not start the answer with "{".')
    body += _what_to_do(policy)
    return "\n".join(body)


def _plain(tool: FunctionTool) -> dict[str, Any]:
    described: dict[str, Any] = {"name": tool.name}
    if tool.description:
        described["description"] = tool.description
    described["parameters"] = tool.parameters
    return described


def _what_to_do(policy: ToolPolicy) -> list[str]:
    if policy.forced is not None:
        return ["", f"Answer with a call of the function {policy.forced}."]
    if policy.mode == "required":
        return ["", "Answer by calling one or more of the functions."]
    return []


def with_tools(system: str, block: str) -> str:
    return f"{system}\n\n{block}" if system else block


def calls_text(
    syntax: ToolCallSyntax, calls: Sequence[tuple[str, dict[str, Any]]], guard: ControlTokenGuard
) -> str:
    """Earlier calls as the model wrote them: (name, arguments) each."""
    written = [(name, guard.neutralise(compact_json(arguments))) for name, arguments in calls]
    return syntax.calls_text(written)


def assistant_text(syntax: ToolCallSyntax, content: str, calls: str) -> str:
    """An assistant turn's text: what it said, then its calls."""
    if not content:
        return calls
    return content + ("\n" if syntax.text_before_calls else "\n\n") + calls


# Where results go: a user turn, or the syntax's own role.
RESULT_SPEAKER = {LLAMA3_JSON.name: "ipython"}


def result_speaker(syntax: ToolCallSyntax) -> str:
    return RESULT_SPEAKER.get(syntax.name, "user")


def result_text(syntax: ToolCallSyntax, name: str, content: str) -> str:
    """A tool's result (its content already neutralised) as the model reads it."""
    if syntax.name == HERMES.name:
        return f"<tool_response>\n{content}\n</tool_response>"
    if syntax.name == LLAMA3_JSON.name:
        return content
    return compact_json({"tool_result": {"name": name, "content": _as_json(content)}})


def _as_json(content: str) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content
