"""How a model writes tool calls in its answer, per conversation template.

Three syntaxes, each one call object `{"name": <function>, <arguments key>: {...}}`:

- `HERMES` (Qwen2 / NVILA and Hermes-style templates): each call in a block
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, blocks one per line; text may
  come before the first block.
- `LLAMA3_JSON` (Llama 3.1's JSON tool calling): the answer is the call itself,
  `{"name": "f", "parameters": {...}}`; several calls are separated by `; `.
- `GENERIC_JSON`, this server's convention for templates that have no tool syntax (Vicuna,
  LLaVA, ChatML, most tokenizers' own templates): the answer is one JSON object
  `{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}`.

In the two JSON syntaxes an answer that starts with `{` (after any whitespace) is a call; any
other answer is text.
The prompt that offers the tools (`tool_prompt`), the grammar that constrains the answer
(`tool_grammar`) and the parser that reads it back (`tool_call_parser`) all use the syntax here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from vilaserve.domain.shared.conversation import ConversationTemplate, SeparatorStyle


@dataclass(frozen=True)
class ToolCallSyntax:
    """The canonical text around calls; a parser also takes any whitespace between pieces."""

    name: str
    arguments_key: str
    calls_open: str  # before the first call
    call_open: str  # before each call object
    call_close: str  # after each call object
    separator: str  # between two calls
    calls_close: str  # after the last call
    text_before_calls: bool  # free text may precede the calls

    @property
    def opening(self) -> str:
        """The text that starts the calls; in the JSON syntaxes, the answer's first `{`."""
        return (self.calls_open + self.call_open) or "{"

    def call_head(self, name: str) -> str:
        """A call object's text up to its arguments."""
        return f'{{"name": {json.dumps(name)}, "{self.arguments_key}": '

    def call_object(self, name: str, arguments_json: str) -> str:
        return self.call_head(name) + arguments_json + "}"

    def calls_text(self, calls: Sequence[tuple[str, str]]) -> str:
        """Calls as the model writes them: (function name, arguments as JSON text) each."""
        blocks = [self.call_open + self.call_object(*c) + self.call_close for c in calls]
        return self.calls_open + self.separator.join(blocks) + self.calls_close


HERMES = ToolCallSyntax(
    name="hermes",
    arguments_key="arguments",
    calls_open="",
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    separator="\n",
    calls_close="",
    text_before_calls=True,
)
LLAMA3_JSON = ToolCallSyntax(
    name="llama3_json",
    arguments_key="parameters",
    calls_open="",
    call_open="",
    call_close="",
    separator="; ",
    calls_close="",
    text_before_calls=False,
)
GENERIC_JSON = ToolCallSyntax(
    name="generic_json",
    arguments_key="arguments",
    calls_open='{"tool_calls": [',
    call_open="",
    call_close="",
    separator=", ",
    calls_close="]}",
    text_before_calls=False,
)

HERMES_TEMPLATES = frozenset({"qwen2", "hermes-2"})


@dataclass(frozen=True)
class ToolConvention:
    """A template's tool syntax, and whether its Jinja template renders tools itself (then the
    tools, calls and results are handed to it; otherwise the API writes them as text)."""

    syntax: ToolCallSyntax
    jinja_renders_tools: bool = False


def tool_convention_for(template: ConversationTemplate) -> ToolConvention:
    source = template.chat_template
    if source is not None:
        if "tools" in source and "<tool_call>" in source:
            return ToolConvention(HERMES, jinja_renders_tools=True)
        if "tools" in source and "<|start_header_id|>" in source and "ipython" in source:
            return ToolConvention(LLAMA3_JSON, jinja_renders_tools=True)
        return ToolConvention(GENERIC_JSON)
    if template.name in HERMES_TEMPLATES:
        return ToolConvention(HERMES)
    if template.sep_style == SeparatorStyle.LLAMA3:  # results go in `ipython` turns
        return ToolConvention(LLAMA3_JSON)
    return ToolConvention(GENERIC_JSON)
