"""The `ConstraintCompiler` port on llguidance: a request's `structured_outputs` becomes a
grammar matched against the model's own tokenizer.

The tokenizer is converted for llguidance once (about a second for a 50k vocabulary). Each
constraint is compiled once into a matcher that never moves (its start state), kept in a
bounded LRU by `OutputConstraint.key`; every request gets a copy of it (`TokenGuide`), whose
state belongs to the request, never to a cache row.

JSON answers are laid out as `json.dumps` writes them (`", "` and `": "`, no other
whitespace): a small model left free to add whitespace can spend its whole answer on it.
A schema's own `x-guidance` options override this.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import llguidance
import llguidance.hf
from llguidance import LLMatcher

from vilaserve.adapters.worker.torch_vila.token_guide import TokenGuide
from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.generation import STRUCTURED_OUTPUTS, OutputConstraint
from vilaserve.domain.worker.ports import CompiledConstraint, ConstraintCompiler

log = logging.getLogger(__name__)

JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT = '{"type": "object"}'
DEFAULT_CACHE_SIZE = 64
# llguidance's messages quote the grammar with a caret under the fault; more says nothing new.
MAX_MESSAGE_CHARS = 1000


class LlguidanceConstraint(CompiledConstraint):
    """A compiled constraint: its start-state matcher, copied for each request."""

    def __init__(
        self,
        constraint: OutputConstraint,
        matcher: LLMatcher,
        vocab_size: int,
        end_token_ids: frozenset[int],
    ) -> None:
        self._constraint = constraint
        self._start = matcher
        self.vocab_size = vocab_size
        self.end_token_ids = end_token_ids  # what a complete answer allows: they end it

    @property
    def constraint(self) -> OutputConstraint:
        return self._constraint

    def guide(self) -> TokenGuide:
        """A fresh state for one request (the start matcher itself is never advanced)."""
        return TokenGuide(self._start.deep_copy(), self.vocab_size)


class LlguidanceConstraintCompiler(ConstraintCompiler):
    def __init__(
        self,
        tokenizer: Any,
        end_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """`tokenizer`: the model's (a fast Hugging Face tokenizer). `end_token_ids`: the ids
        that end an answer (the tokenizer's and the template's): the only tokens a finished
        grammar allows, so that a constrained answer ends "stop" as any other."""
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, eos_token=sorted(set(end_token_ids)) or None
        )
        self.end_token_ids = frozenset(self._tokenizer.eos_tokens)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, LlguidanceConstraint] = OrderedDict()
        self._lock = threading.Lock()  # requests compile on threads of their own

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    def compile(self, constraint: OutputConstraint) -> LlguidanceConstraint:
        key = constraint.key
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        # Outside the lock: one slow schema does not hold up the others (two requests that
        # compile the same one at once both do the work; the cache keeps one).
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: OutputConstraint) -> LlguidanceConstraint:
        name = f"{STRUCTURED_OUTPUTS}.{constraint.kind}"
        grammar = grammar_text(constraint, name)
        # Never raises for a bad grammar: it comes back in error, with llguidance's message.
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"'{name}' cannot be used: {_short(matcher.get_error())}")
        return LlguidanceConstraint(constraint, matcher, self.vocab_size, self.end_token_ids)


class CompilerBuiltInBackground(ConstraintCompiler):
    """An `LlguidanceConstraintCompiler` built on a thread of its own, so that the worker
    starts serving without waiting for it: converting a tokenizer takes from under a second
    (SmolLM2's 49k tokens) to ~11 s (a 32k Llama tokenizer, 2-core AVX2 EPYC). A constrained
    request that comes before it is ready waits for it (it compiles on a thread already); one
    whose tokenizer llguidance cannot read is refused, naming why."""

    def __init__(self, tokenizer: Any, end_token_ids: Sequence[int]) -> None:
        self._built: Future[LlguidanceConstraintCompiler] = Future()
        threading.Thread(
            target=self._build,
            args=(tokenizer, end_token_ids),
            name="constraint-compiler",
            daemon=True,
        ).start()

    def _build(self, tokenizer: Any, end_token_ids: Sequence[int]) -> None:
        try:
            self._built.set_result(LlguidanceConstraintCompiler(tokenizer, end_token_ids))
        except Exception as exc:  # the worker serves on; only constrained output is refused
            log.warning(
                "structured outputs unavailable: no constraint compiler for this tokenizer",
                extra={"reason": f"{type(exc).__name__}: {exc}"},
            )
            self._built.set_exception(exc)

    def compile(self, constraint: OutputConstraint) -> LlguidanceConstraint:
        try:
            compiler = self._built.result()
        except Exception as exc:
            raise InvalidRequest(
                f"'{STRUCTURED_OUTPUTS}' cannot be used with this model: its tokenizer could "
                f"not be read for constrained decoding ({type(exc).__name__}: {exc})"
            ) from exc
        return compiler.compile(constraint)


def grammar_text(constraint: OutputConstraint, name: str) -> str:
    """llguidance's grammar for `constraint`; raises `InvalidRequest` for a schema llguidance
    cannot read (what it cannot compile is found by the matcher)."""
    kind, spec = constraint.kind, constraint.spec
    if kind in ("json", "json_object"):
        schema = spec if kind == "json" else ANY_JSON_OBJECT
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except ValueError as exc:
            raise InvalidRequest(f"'{name}' cannot be used: {_short(str(exc))}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        # JSON string literals are Lark's too; an empty choice is an empty alternative.
        alternatives = " | ".join(json.dumps(choice) for choice in json.loads(spec))
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(spec)


def _short(message: str) -> str:
    message = message.strip()
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + "..."
