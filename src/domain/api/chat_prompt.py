"""OpenAI chat messages -> the prompt string a VILA worker reads, with its images in order.

The worker's own conversation template (`/worker_get_conv_template`) renders the turns, so the
API writes exactly what the model was trained on. Images go where VILA and LLaVA expect them:
one `<image>\\n` per image at the start of the user turn that carried them.

What the client wrote (system, user and assistant text alike) is neutralised first, so that
none of it can tokenize as one of the template's control tokens (`control_tokens`); the
template's own default system message and markers stay as they are.

Tools (offered ones, earlier calls and their results) are written in the template's tool
syntax (`tool_syntax`): by its Jinja template when that renders tools itself, else as text
(`tool_prompt`). A request without tools gets the same prompt as before tools existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from vilaserve.domain.api import tool_prompt
from vilaserve.domain.api.control_tokens import ControlTokenGuard, guard_for, template_markers
from vilaserve.domain.api.errors import BadRequest, UpstreamFailure
from vilaserve.domain.api.openai_requests import ChatMessage, ImagePart, TextPart, ToolCall
from vilaserve.domain.api.tool_definitions import ToolPolicy
from vilaserve.domain.api.tool_syntax import ToolConvention, tool_convention_for
from vilaserve.domain.shared.conversation import (
    ChatTemplateRenderer,
    ConversationTemplate,
    SeparatorStyle,
)
from vilaserve.domain.shared.generation import IMAGE_PLACEHOLDER

IMAGE_TURN_PREFIX = IMAGE_PLACEHOLDER + "\n"


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    image_urls: tuple[str, ...]  # as the client gave them: data URLs or http(s) URLs


@dataclass
class _Turn:
    speaker: str  # "user", "assistant", or a template's own role for tool results ("ipython")
    texts: list[str] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)

    def render(self) -> str:
        return IMAGE_TURN_PREFIX * len(self.image_urls) + "\n".join(self.texts)


def build_chat_prompt(
    template: ConversationTemplate,
    messages: Sequence[ChatMessage],
    multimodal: bool,
    renderer: ChatTemplateRenderer | None = None,
    tools: ToolPolicy | None = None,
) -> ChatPrompt:
    """Raises `BadRequest` naming the message (1-based) that cannot be rendered.

    `renderer`: for a template that is the tokenizer's Jinja template (`chat_template`).
    `tools`: the tools offered to the model (None: none, or tool_choice "none")."""
    with_tools = tools is not None or any(m.role == "tool" or m.tool_calls for m in messages)
    if not with_tools:
        plain = _TextPrompt(template, guard_for(template), None)
        return plain.build(messages, multimodal, renderer)
    convention = tool_convention_for(template)
    guard = _tool_guard(template, convention)
    if convention.jinja_renders_tools and renderer is not None:
        return _JinjaToolPrompt(template, guard, tools).build(messages, multimodal, renderer)
    return _TextPrompt(template, guard, convention, tools).build(messages, multimodal, renderer)


@lru_cache(maxsize=64)
def _tool_guard(template: ConversationTemplate, convention: ToolConvention) -> ControlTokenGuard:
    markers = template_markers(template) | tool_prompt.markers_of(convention.syntax)
    return ControlTokenGuard(markers)


class _Messages:
    """What both renderings share: reading each message's text and images, checked."""

    def __init__(self, template: ConversationTemplate, guard: ControlTokenGuard) -> None:
        self._template = template
        self._guard = guard
        self._called: dict[str, str] = {}  # call id -> function name, of earlier calls

    def _read(self, message: ChatMessage, number: int, multimodal: bool) -> tuple[str, list[str]]:
        text, urls = _content(message, number)
        if urls and message.role != "user":
            raise BadRequest(f"message {number}: images are only allowed in user messages")
        if urls and not multimodal:
            raise BadRequest(f"message {number}: this model is text-only and takes no images")
        return self._guard.neutralise(text), urls

    def _calls(self, calls: Sequence[ToolCall]) -> list[tuple[str, dict[str, Any]]]:
        for call in calls:
            self._called[call.id] = call.function.name
        return [(call.function.name, call.function.parsed_arguments) for call in calls]

    def _answered(self, message: ChatMessage, number: int) -> str:
        """The name of the function whose call a tool message answers."""
        call_id = message.tool_call_id or ""
        if call_id not in self._called:
            raise BadRequest(
                f"message {number}: tool_call_id {call_id!r} answers no tool call of an earlier "
                "assistant message",
                param=f"messages.{number - 1}.tool_call_id",
            )
        return self._called[call_id]

    def _system(self, texts: list[str], block: str = "") -> str | None:
        """The system message: the client's (else the template's default, when tools are
        described in it), then the tools (`block`)."""
        system = "\n".join(texts) if texts else None
        if not block:
            return system
        base = self._template.system_message if system is None else system
        return tool_prompt.with_tools(base, block)


class _TextPrompt(_Messages):
    """Turns of text rendered by the template; tools, calls and results written as text."""

    def __init__(
        self,
        template: ConversationTemplate,
        guard: ControlTokenGuard,
        convention: ToolConvention | None,
        tools: ToolPolicy | None = None,
    ) -> None:
        super().__init__(template, guard)
        self._syntax = convention.syntax if convention else None
        self._tools = tools

    def build(
        self,
        messages: Sequence[ChatMessage],
        multimodal: bool,
        renderer: ChatTemplateRenderer | None,
    ) -> ChatPrompt:
        template = self._template
        system_texts: list[str] = []
        turns: list[_Turn] = []
        for number, message in enumerate(messages, start=1):
            text, urls = self._read(message, number, multimodal)
            if message.role in ("system", "developer"):
                system_texts.append(text)
                continue
            speaker: str = message.role
            if message.tool_calls and self._syntax is not None:
                calls = tool_prompt.calls_text(
                    self._syntax, self._calls(message.tool_calls), self._guard
                )
                text = tool_prompt.assistant_text(self._syntax, text, calls)
            if message.role == "tool" and self._syntax is not None:
                name = self._answered(message, number)
                speaker = tool_prompt.result_speaker(self._syntax)
                text = tool_prompt.result_text(self._syntax, name, text)
            if message.role == "assistant" and not text:
                continue  # an empty reply (e.g. one stopped before its first token) says nothing
            if message.role == "user" and not text and not urls:
                raise BadRequest(f"message {number}: a user message needs text or an image")
            # Templates alternate user and assistant; consecutive messages of one role merge.
            if not turns or turns[-1].speaker != speaker:
                turns.append(_Turn(speaker))
            if text:
                turns[-1].texts.append(text)
            turns[-1].image_urls.extend(urls)
        user_role, assistant_role = template.roles
        roles = {"user": user_role, "assistant": assistant_role}
        rendered = [(roles.get(t.speaker, t.speaker), t.render()) for t in turns]
        block = ""
        if self._tools is not None and self._syntax is not None:
            block = tool_prompt.tools_block(self._syntax, self._tools, self._guard)
        system = self._system(system_texts, block)
        try:
            text = template.render([*rendered, (assistant_role, None)], system, renderer)
        except Exception as exc:  # a foreign worker's template we cannot render, a Jinja error
            raise UpstreamFailure(f"the worker's template {template.name!r} failed: {exc}") from exc
        images = tuple(url for turn in turns for url in turn.image_urls)
        return ChatPrompt(text, images)


class _JinjaToolPrompt(_Messages):
    """Messages in Hugging Face's chat format (tool calls and results included), and the
    tools, for a tokenizer's Jinja template that renders them itself."""

    def __init__(
        self, template: ConversationTemplate, guard: ControlTokenGuard, tools: ToolPolicy | None
    ) -> None:
        super().__init__(template, guard)
        self._tools = tools

    def build(
        self, messages: Sequence[ChatMessage], multimodal: bool, renderer: ChatTemplateRenderer
    ) -> ChatPrompt:
        template = self._template
        system_texts: list[str] = []
        chat: list[dict[str, Any] | _Turn] = []  # user turns stay turns until rendered
        for number, message in enumerate(messages, start=1):
            text, urls = self._read(message, number, multimodal)
            if message.role in ("system", "developer"):
                system_texts.append(text)
            elif message.role == "tool":
                name = self._answered(message, number)
                result = {"role": "tool", "content": text, "name": name}
                chat.append({**result, "tool_call_id": message.tool_call_id})
            elif message.tool_calls:
                chat.append(self._assistant_calls(text, message.tool_calls))
            elif message.role == "assistant":
                if text:
                    chat.append({"role": "assistant", "content": text})
            else:
                if not text and not urls:
                    raise BadRequest(f"message {number}: a user message needs text or an image")
                if not chat or not isinstance(chat[-1], _Turn):
                    chat.append(_Turn("user"))
                turn = chat[-1]
                assert isinstance(turn, _Turn)
                if text:
                    turn.texts.append(text)
                turn.image_urls.extend(urls)
        system = self._system(system_texts)
        if system is None:
            system = template.system_message
        rendered = [{"role": "system", "content": system}] if system else []
        rendered += [
            {"role": "user", "content": m.render()} if isinstance(m, _Turn) else m for m in chat
        ]
        offered = None
        if self._tools is not None:
            offered = [_neutralised(t.to_openai(), self._guard) for t in self._tools.tools]
        try:
            text = renderer.render(
                template.chat_template or "", rendered, add_generation_prompt=True, tools=offered
            )
        except Exception as exc:  # a Jinja error, a template that refuses the conversation
            raise UpstreamFailure(f"the worker's template {template.name!r} failed: {exc}") from exc
        images = tuple(url for m in chat if isinstance(m, _Turn) for url in m.image_urls)
        return ChatPrompt(text, images)

    def _assistant_calls(self, text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
        written = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": name, "arguments": _neutralised(arguments, self._guard)},
            }
            for call, (name, arguments) in zip(calls, self._calls(calls), strict=True)
        ]
        return {"role": "assistant", "content": text, "tool_calls": written}


def _neutralised(value: Any, guard: ControlTokenGuard) -> Any:
    """A JSON value from the client with every string (keys too) neutralised."""
    if isinstance(value, str):
        return guard.neutralise(value)
    if isinstance(value, dict):
        return {guard.neutralise(k): _neutralised(v, guard) for k, v in value.items()}
    if isinstance(value, list):
        return [_neutralised(v, guard) for v in value]
    return value


def _content(message: ChatMessage, number: int) -> tuple[str, list[str]]:
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        texts, urls = [content], []
    else:
        texts = [part.text for part in content if isinstance(part, TextPart)]
        urls = [part.image_url.url for part in content if isinstance(part, ImagePart)]
    text = "\n".join(texts)
    if IMAGE_PLACEHOLDER in text:
        raise BadRequest(
            f"message {number} contains the text '{IMAGE_PLACEHOLDER}', which marks image "
            "positions for this model; send images as image_url parts instead"
        )
    return text, urls


def check_completion_prompt(prompt: str, index: int) -> None:
    if IMAGE_PLACEHOLDER in prompt:
        raise BadRequest(
            f"prompt {index + 1} contains '{IMAGE_PLACEHOLDER}'; /v1/completions is text-only, "
            "use /v1/chat/completions with image_url parts for images",
            param="prompt",
        )


def template_from_worker(conv: Mapping[str, Any]) -> ConversationTemplate:
    """Rebuilds the template from the `conv` object of `/worker_get_conv_template`.

    Reads FastChat's `Conversation` fields, so templates of FastChat-protocol workers other
    than ours work too, as long as their separator style is one we render.
    """
    try:
        style = SeparatorStyle(int(conv["sep_style"]))
        roles = tuple(conv["roles"])
        stop_str = conv.get("stop_str") or ()
        return ConversationTemplate(
            name=str(conv.get("name") or "worker"),
            system_message=str(conv.get("system_message") or ""),
            system_template=str(conv.get("system_template") or "{system_message}"),
            roles=(str(roles[0]), str(roles[1])),
            sep_style=style,
            sep=str(conv.get("sep") or ""),
            sep2=str(conv.get("sep2") or ""),
            stop_str=(stop_str,) if isinstance(stop_str, str) else tuple(map(str, stop_str)),
            stop_token_ids=tuple(int(t) for t in conv.get("stop_token_ids") or ()),
            chat_template=conv.get("chat_template") or None,
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UpstreamFailure(
            f"the worker's conversation template cannot be used ({type(exc).__name__}: {exc})"
        ) from exc
