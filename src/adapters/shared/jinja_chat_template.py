"""Renders a tokenizer's Jinja chat template, in Jinja's sandbox: the template comes from a
model's files or from a worker, and must not reach Python's internals.

The environment is the one Hugging Face renders chat templates in (so the prompt is the one the
model was trained on): its `tojson` (keys in their order, no HTML escaping, unlike Jinja's own)
and its `raise_exception`, which templates call to refuse a conversation they cannot write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vilaserve.domain.shared.conversation import ChatTemplateRenderer


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


class JinjaChatTemplateRenderer(ChatTemplateRenderer):
    def __init__(self) -> None:
        # Hugging Face's settings for chat templates.
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.filters["tojson"] = _tojson
        self._env.globals["raise_exception"] = _raise_exception

    def render(
        self,
        source: str,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        context: dict[str, Any] = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": "",
            "eos_token": "",
        }
        if tools is not None:  # templates test `tools is defined` as well as `tools`
            context["tools"] = list(tools)
        return self._env.from_string(source).render(**context)
