"""The grammar (llguidance's Lark dialect) that holds an answer to a `ToolPolicy` in a template's
`ToolCallSyntax`; the worker applies it as `structured_outputs: {"grammar": ...}`.

Each callable function is one alternative: the call object's text up to its arguments is a
literal (so the name is one of the functions, written exactly), the arguments are its
`parameters` schema (`%json`), written compactly (`", "` and `": "` between items, as the prompt
shows calls). Then:

- "required": one call, or several in the syntax's separator when `parallel_tool_calls`;
- a named function: exactly one call, of that function;
- "auto": text or the calls. In `HERMES` the text may also precede the calls, and it may not
  contain `<tool_call>` (once the model writes it, a call follows). In the JSON syntaxes the
  text may not start with `{`, whitespace first or not (an answer that does is a call).
"""

from __future__ import annotations

import json
import re
from typing import Any

from vilaserve.domain.api.tool_definitions import FunctionTool, ToolPolicy
from vilaserve.domain.api.tool_syntax import ToolCallSyntax

# What may come before the calls in the JSON syntaxes (a tokenizer's " {" is one token).
SPACE = r"[ \t\r\n]"
# llguidance's JSON options (`x-guidance`): the arguments written as `json.dumps` writes them.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_call_grammar(syntax: ToolCallSyntax, policy: ToolPolicy) -> str:
    lines = _call_objects(syntax, policy.callable_tools)
    one = _sequence(_literal(syntax.call_open), "call", _literal(syntax.call_close))
    more = f"({_sequence(_literal(syntax.separator), one)})*" if policy.many_calls else ""
    calls = _sequence(_literal(syntax.calls_open), one, more, _literal(syntax.calls_close))
    if policy.mode != "auto":
        start = f"start: {calls}"
    elif syntax.text_before_calls:
        marker = syntax.opening.strip()
        if syntax.calls_open or not syntax.call_open.startswith(marker):
            raise ValueError(f"syntax {syntax.name}: text before calls needs a leading marker")
        rest = syntax.call_open[len(marker) :]
        marker_regex = _regex(re.escape(marker))
        lines += [
            f"TEXT: /(?s:.*)/ & ~/(?s:.*){marker_regex}(?s:.*)/",
            # Lazy: the text ends at the first marker, and the call goes on from there.
            f"lead[lazy]: /(?s:.*){marker_regex}/",
        ]
        after_marker = _sequence("lead", _literal(rest), "call", _literal(syntax.call_close), more)
        start = f"start: TEXT | {after_marker}"
    else:
        # Text may not start like a call, whitespace first or not (then it is one).
        first = _regex(re.escape(syntax.opening.strip()[0]))
        lines += [f"TEXT: /(?s:.*)/ & ~/{SPACE}*{first}(?s:.*)/", f"SPACE: /{SPACE}+/"]
        start = f"start: TEXT | SPACE? {calls}"
    return "\n".join([start, *lines]) + "\n"


def _call_objects(syntax: ToolCallSyntax, tools: tuple[FunctionTool, ...]) -> list[str]:
    names = [f"call_{index}" for index in range(len(tools))]
    lines = [f"call: {' | '.join(names)}"]
    for rule, tool in zip(names, tools, strict=True):
        head = _literal(syntax.call_head(tool.name))
        lines.append(f"{rule}: {head} {rule}_arguments {_literal('}')}")
        lines.append(f"{rule}_arguments: %json {json.dumps(_compact(tool.parameters))}")
    return lines


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    options = {**COMPACT_JSON, **(schema.get("x-guidance") or {})}
    return {**schema, "x-guidance": options}


def _literal(text: str) -> str:
    """A Lark string literal ("" for nothing: an empty literal is not allowed)."""
    return json.dumps(text) if text else ""


def _regex(escaped: str) -> str:
    # Inside /.../ a slash ends the regex.
    return escaped.replace("/", "\\/")


def _sequence(*parts: str) -> str:
    return " ".join(part for part in parts if part)
