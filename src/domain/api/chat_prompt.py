"""OpenAI chat messages -> the prompt string a VILA worker reads, with its images in order.

The worker's own conversation template (`/worker_get_conv_template`) renders the turns, so the
API writes exactly what the model was trained on. Images go where VILA and LLaVA expect them:
one `<image>\\n` per image at the start of the user turn that carried them.

What the client wrote (system, user and assistant text alike) is neutralised first, so that
none of it can tokenize as one of the template's control tokens (`control_tokens`); the
template's own default system message and markers stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vilaserve.domain.api.control_tokens import guard_for
from vilaserve.domain.api.errors import BadRequest, UpstreamFailure
from vilaserve.domain.api.openai_requests import ChatMessage, ImagePart, TextPart
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
    speaker: str  # "user" or "assistant"
    texts: list[str] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)

    def render(self) -> str:
        return IMAGE_TURN_PREFIX * len(self.image_urls) + "\n".join(self.texts)


def build_chat_prompt(
    template: ConversationTemplate,
    messages: Sequence[ChatMessage],
    multimodal: bool,
    renderer: ChatTemplateRenderer | None = None,
) -> ChatPrompt:
    """Raises `BadRequest` naming the message (1-based) that cannot be rendered.

    `renderer`: for a template that is the tokenizer's Jinja template (`chat_template`)."""
    guard = guard_for(template)
    system_texts: list[str] = []
    turns: list[_Turn] = []
    for number, message in enumerate(messages, start=1):
        text, urls = _content(message, number)
        text = guard.neutralise(text)
        if message.role in ("system", "developer"):
            if urls:
                raise BadRequest(f"message {number}: images are only allowed in user messages")
            system_texts.append(text)
            continue
        if urls and message.role != "user":
            raise BadRequest(f"message {number}: images are only allowed in user messages")
        if urls and not multimodal:
            raise BadRequest(f"message {number}: this model is text-only and takes no images")
        if message.role == "assistant" and not text:
            continue  # an empty reply (e.g. one stopped before its first token) says nothing
        if message.role == "user" and not text and not urls:
            raise BadRequest(f"message {number}: a user message needs text or an image")
        # Templates alternate user and assistant; consecutive messages of one role merge.
        if not turns or turns[-1].speaker != message.role:
            turns.append(_Turn(message.role))
        if text:
            turns[-1].texts.append(text)
        turns[-1].image_urls.extend(urls)
    user_role, assistant_role = template.roles
    rendered = [(user_role if t.speaker == "user" else assistant_role, t.render()) for t in turns]
    system = "\n".join(system_texts) if system_texts else None
    try:
        text = template.render([*rendered, (assistant_role, None)], system, renderer)
    except Exception as exc:  # a foreign worker's template we cannot render, a Jinja error
        raise UpstreamFailure(f"the worker's template {template.name!r} failed: {exc}") from exc
    images = tuple(url for turn in turns for url in turn.image_urls)
    return ChatPrompt(text, images)


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
