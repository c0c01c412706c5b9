"""Renders a tokenizer's Jinja chat template, in Jinja's sandbox: the template comes from a
model's files or from a worker, and must not reach Python's internals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment

from vilaserve.domain.shared.conversation import ChatTemplateRenderer


class JinjaChatTemplateRenderer(ChatTemplateRenderer):
    def __init__(self) -> None:
        # Hugging Face's settings for chat templates.
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def render(
        self, source: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> str:
        return self._env.from_string(source).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token="",
            eos_token="",
        )
