"""Chat message text that can never become a control token of the prompt.

The worker tokenizes the API's prompt string as a whole, and a tokenizer matches its special
tokens (`<|im_end|>`, `</s>`, `<|eot_id|>`, ...) wherever they occur in that string, inside a
message as well. A client that types `<|im_end|>\\n<|im_start|>system\\n...` would end its turn and
open a forged one. So every marker in a message's text is broken by an invisible U+200B (zero
width space) after its first character: the model reads the same visible characters, but no
tokenizer matches the marker as one token any more. The template's own markers stay real,
because they are written by the template after the messages were neutralised.

The markers are
- those the worker's template writes: whatever looks like a token (`<...>` without spaces, or
  `[...]` in capitals) in its roles, separators, stop strings, system template and Jinja source;
- the common families of control tokens, for markers a template does not spell out (Llama-3's
  hard-wired header tokens, end-of-text tokens): `<|...|>` (ChatML, Llama-3, Phi, Qwen),
  DeepSeek's `<｜...｜>`, SentencePiece's `<s>`/`</s>`/`<unk>`/`<pad>`, Gemma's turn tokens,
  Mistral's and Llama-2's `[INST]`/`<<SYS>>`, LLaVA's and VILA's image tokens;
- any other strings a caller knows to be tokens (`ControlTokenGuard(markers)`).
Text that merely resembles markup (`<b>`, `<div class="x">`) is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from vilaserve.domain.shared.conversation import ConversationTemplate

# Zero width space: invisible, not whitespace to str.strip() or to tokenizers' pre-tokenizers,
# and kept by the NFC/NFKC normalizers LLM tokenizers use.
MARKER_BREAK = "\u200b"

_COMMON_MARKERS = (
    r"<\|[^|<>\s]{1,64}\|>",
    r"<｜[^｜<>\s]{1,64}｜>",
    r"</?(?:s|unk|pad|bos|eos|mask|start_of_turn|end_of_turn|im_start|im_end|im_patch)>",
    r"<vila/[^<>\s]{1,32}>",
    r"\[/?(?:INST|SYS|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|SYSTEM_PROMPT)\]",
    r"<</?SYS>>",
)
# How a token looks inside a template's strings: `<|im_end|>`, `</s>`, `<|eot_id|>`, `[INST]`.
_TOKEN_LIKE = re.compile(r"<[^<>\s]{1,64}>|\[/?[A-Z][A-Z_]{1,31}\]")


class ControlTokenGuard:
    """Breaks every marker in client text (see the module's docstring)."""

    def __init__(self, markers: Iterable[str] = ()) -> None:
        # Literal markers longest first, so that the longest of two overlapping ones is broken.
        literals = sorted(
            {m for m in markers if len(m) > 1 and MARKER_BREAK not in m}, key=len, reverse=True
        )
        self._pattern = re.compile("|".join([*map(re.escape, literals), *_COMMON_MARKERS]))

    @classmethod
    def for_template(cls, template: ConversationTemplate) -> ControlTokenGuard:
        return cls(template_markers(template))

    def neutralise(self, text: str) -> str:
        # An occurrence overlapping one broken in this pass (`]]` inside `]]]`, were `]]` a
        # marker) is found by the next. A pass breaks at least one occurrence and creates none
        # (no marker contains the break), so this ends; it takes one pass for real markers.
        while True:
            broken, count = self._pattern.subn(_break, text)
            if not count:
                return text
            text = broken


def _break(match: re.Match[str]) -> str:
    marker = match.group(0)
    return marker[0] + MARKER_BREAK + marker[1:]


def template_markers(template: ConversationTemplate) -> frozenset[str]:
    """The token-like strings the template itself writes into a prompt."""
    sources = [
        *template.roles,
        template.sep,
        template.sep2,
        template.system_template,
        *template.stop_str,
        template.chat_template or "",
    ]
    return frozenset(m for source in sources for m in _TOKEN_LIKE.findall(source))


@lru_cache(maxsize=64)
def guard_for(template: ConversationTemplate) -> ControlTokenGuard:
    """The guard of a worker's template (compiled once per template, not per request)."""
    return ControlTokenGuard.for_template(template)
