"""How long a prompt may be before anything tokenizes it.

Tokenizing is the one cost a request's text imposes before the context check can refuse it: a
20 MB prompt took 11.7 s and 4.5 GB of the worker to be told it does not fit. A prompt can hold
at most one context of positions, and no tokenizer puts more than a few characters in an
average token, so `CHARS_PER_POSITION` x the context bounds what can possibly fit, with room to
spare for long runs of spaces or digits; beyond it the prompt is refused on its length alone.
"""

from __future__ import annotations

from vilaserve.domain.shared.errors import ContextOverflow

CHARS_PER_POSITION = 32


def prompt_char_limit(context_length: int, configured: int | None = None) -> int:
    return configured if configured is not None else CHARS_PER_POSITION * context_length


def check_prompt_chars(prompt: str, context_length: int, configured: int | None = None) -> None:
    """Raises `ContextOverflow` for a prompt longer than any that could fit the context."""
    limit = prompt_char_limit(context_length, configured)
    if len(prompt) > limit:
        raise ContextOverflow(
            f"the prompt has {len(prompt):,} characters; this worker reads at most {limit:,} "
            f"(its model's context is {context_length:,} positions), so it cannot fit"
        )
