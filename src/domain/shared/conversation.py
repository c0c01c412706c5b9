"""Conversation templates: how a chat becomes the prompt string a VILA model was trained on.

The three VILA-1.5 templates (`vicuna_v1`, `llama_3`, `hermes-2`) plus ChatML, and the tokenizer's
own Jinja chat template (rendered by a `ChatTemplateRenderer`: the domain holds no template
engine). Field names follow FastChat's `Conversation` so that FastChat's OpenAI server can rebuild
the template from `/worker_get_conv_template`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any


class SeparatorStyle(IntEnum):
    """FastChat's `SeparatorStyle` values (numbering of FastChat after the Llama-3 release)."""

    ADD_COLON_SINGLE = 1
    ADD_COLON_TWO = 2
    ADD_COLON_SPACE_SINGLE = 3
    NO_COLON_SINGLE = 4
    NO_COLON_TWO = 5
    ADD_NEW_LINE_SINGLE = 6
    LLAMA2 = 7
    LLAMA3 = 8
    CHATGLM = 9
    CHATML = 10


Message = tuple[str, str | None]  # (role, text); text None is the open turn to be generated


class ChatTemplateRenderer(ABC):
    """Renders a tokenizer's Jinja chat template (an adapter: the domain has no template
    engine), with `bos_token` and `eos_token` empty."""

    @abstractmethod
    def render(
        self,
        source: str,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """`messages`: `{"role": "system" | "user" | "assistant", "content": text}`, and in
        Hugging Face's format assistant `tool_calls` and `{"role": "tool", ...}` results.
        `tools`: OpenAI tool definitions, for a template that renders them (None: no tools)."""


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system_message: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str = ""
    system_template: str = "{system_message}"
    stop_str: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # The tokenizer's own Jinja template, when this template *is* the tokenizer's.
    chat_template: str | None = field(default=None, repr=False)

    def with_stop_token_ids(self, ids: Sequence[int]) -> ConversationTemplate:
        merged = tuple(dict.fromkeys((*self.stop_token_ids, *ids)))
        return replace(self, stop_token_ids=merged)

    def render(
        self,
        messages: Sequence[Message],
        system_message: str | None = None,
        renderer: ChatTemplateRenderer | None = None,
    ) -> str:
        """The prompt for `messages`; end with `(assistant_role, None)` to ask for a reply.

        `renderer` renders the template when it is the tokenizer's (`chat_template`); such a
        template cannot be rendered without one (ValueError)."""
        system = self.system_message if system_message is None else system_message
        if self.chat_template is not None:
            if renderer is None:
                raise ValueError(
                    f"template {self.name!r} is a Jinja chat template: rendering it needs a "
                    "ChatTemplateRenderer"
                )
            chat, add_generation_prompt = _chat_messages(self.roles, system, messages)
            return renderer.render(self.chat_template, chat, add_generation_prompt)
        system_prompt = self.system_template.format(system_message=system)
        style = self.sep_style
        if style == SeparatorStyle.ADD_COLON_TWO:
            seps = (self.sep, self.sep2)
            out = system_prompt + seps[0]
            for i, (role, text) in enumerate(messages):
                out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
            return out
        if style == SeparatorStyle.ADD_COLON_SINGLE:
            out = system_prompt + self.sep
            for role, text in messages:
                out += f"{role}: {text}{self.sep}" if text else f"{role}:"
            return out
        if style == SeparatorStyle.NO_COLON_SINGLE:
            out = system_prompt
            for role, text in messages:
                out += f"{role}{text}{self.sep}" if text else role
            return out
        if style == SeparatorStyle.LLAMA3:
            out = "<|begin_of_text|>" + (system_prompt if system else "")
            for role, text in messages:
                out += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
                if text:
                    out += f"{text.strip()}<|eot_id|>"
            return out
        if style == SeparatorStyle.CHATML:
            out = f"{system_prompt}{self.sep}\n" if system else ""
            for role, text in messages:
                out += f"{role}\n{text}{self.sep}\n" if text else f"{role}\n"
            return out
        raise ValueError(f"template {self.name!r}: separator style {style.name} is not supported")

    def to_fastchat_dict(self) -> dict[str, Any]:
        """The `conv` object of `/worker_get_conv_template`, as FastChat's server reads it."""
        return {
            "name": self.name,
            "system_template": self.system_template,
            "system_message": self.system_message,
            "roles": list(self.roles),
            "messages": [],
            "offset": 0,
            "sep_style": int(self.sep_style),
            "sep": self.sep,
            "sep2": self.sep2,
            "stop_str": list(self.stop_str) or None,
            "stop_token_ids": list(self.stop_token_ids) or None,
            "chat_template": self.chat_template,
        }


def _chat_messages(
    roles: tuple[str, str], system: str, messages: Sequence[Message]
) -> tuple[list[dict[str, str]], bool]:
    """The messages as a chat template reads them, and whether a reply is asked for."""
    chat: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    names = {roles[0]: "user", roles[1]: "assistant"}
    add_generation_prompt = False
    for role, text in messages:
        if text is None:
            add_generation_prompt = True
            continue
        chat.append({"role": names.get(role, role), "content": text})
    return chat, add_generation_prompt


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA-1.5's `llava_v1` conversation: Vicuna's separators with LLaVA's own wording.
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)

TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        system_message=VICUNA_SYSTEM,
        roles=("USER", "ASSISTANT"),
        sep_style=SeparatorStyle.ADD_COLON_TWO,
        sep=" ",
        sep2="</s>",
        stop_str=("</s>",),
    ),
    "llama_3": ConversationTemplate(
        name="llama_3",
        system_message=LLAMA3_SYSTEM,
        system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
        roles=("user", "assistant"),
        sep_style=SeparatorStyle.LLAMA3,
        sep="<|eot_id|>",
        sep2="<|end_of_text|>",
        stop_str=("<|eot_id|>", "<|end_of_text|>"),
        stop_token_ids=(128001, 128009),
    ),
    "hermes-2": ConversationTemplate(
        name="hermes-2",
        system_message="Answer the questions.",
        system_template="<|im_start|>system\n{system_message}<|im_end|>",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep_style=SeparatorStyle.NO_COLON_SINGLE,
        sep="<|im_end|>",
        stop_str=("<|im_end|>",),
    ),
    "chatml": ConversationTemplate(
        name="chatml",
        system_message="You are a helpful assistant.",
        system_template="<|im_start|>system\n{system_message}",
        roles=("<|im_start|>user", "<|im_start|>assistant"),
        sep_style=SeparatorStyle.CHATML,
        sep="<|im_end|>",
        stop_str=("<|im_end|>",),
    ),
}

# Same separators as their base, other words: LLaVA-1.5's `llava_v1`, and NVILA's (Qwen2)
# VILA qwen2.jinja for an llm/ tokenizer without a chat template.
TEMPLATES["llava_v1"] = replace(
    TEMPLATES["vicuna_v1"], name="llava_v1", system_message=LLAVA_SYSTEM
)
TEMPLATES["qwen2"] = replace(
    TEMPLATES["chatml"], name="qwen2", system_message="You are a helpful assistant"
)

TOKENIZER_TEMPLATE = "tokenizer"


@dataclass(frozen=True)
class LlmShape:
    """The facts about an LLM config that pick its conversation template."""

    vocab_size: int
    num_layers: int
    num_heads: int
    model_type: str = "llama"


def choose_template(
    shape: LlmShape,
    tokenizer_chat_template: str | None,
    override: str | None = None,
) -> ConversationTemplate:
    """The template named by `override`, else VILA's heuristic from the LLM's shape.

    VILA configs carry no template: vocab 32000 is Vicuna/Llama-2 (`vicuna_v1`), >= 128000 is
    Llama-3 (`llama_3`), and the Yi-34B shape (64000 vocab, 60 layers, 56 heads) is `hermes-2`.
    A Qwen2 LLM (NVILA) and any other model use the tokenizer's own template when it has one.
    """
    name = override or _heuristic_name(shape, tokenizer_chat_template is not None)
    if name == TOKENIZER_TEMPLATE:
        if tokenizer_chat_template is None:
            raise ValueError("template 'tokenizer' asked for, but the tokenizer has none")
        base = TEMPLATES["chatml"] if "<|im_start|>" in tokenizer_chat_template else None
        return ConversationTemplate(
            name=TOKENIZER_TEMPLATE,
            system_message=base.system_message if base else "",
            system_template=base.system_template if base else "{system_message}",
            roles=base.roles if base else ("user", "assistant"),
            sep_style=base.sep_style if base else SeparatorStyle.CHATML,
            sep=base.sep if base else "",
            stop_str=base.stop_str if base else (),
            chat_template=tokenizer_chat_template,
        )
    if name not in TEMPLATES:
        known = ", ".join([*TEMPLATES, TOKENIZER_TEMPLATE])
        raise ValueError(f"unknown conversation template {name!r}; known: {known}")
    return TEMPLATES[name]


def _heuristic_name(shape: LlmShape, has_tokenizer_template: bool) -> str:
    if shape.model_type == "qwen2":
        # NVILA asks the tokenizer's own template ("auto" conversation mode).
        return TOKENIZER_TEMPLATE if has_tokenizer_template else "qwen2"
    if shape.vocab_size == 32000:
        return "vicuna_v1"
    if shape.vocab_size >= 128000:
        return "llama_3"
    if (shape.vocab_size, shape.num_layers, shape.num_heads) == (64000, 60, 56):
        return "hermes-2"
    return TOKENIZER_TEMPLATE if has_tokenizer_template else "vicuna_v1"
