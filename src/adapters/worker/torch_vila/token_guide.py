"""One request's place in its output constraint: which tokens may come next, and the token
that came. Used on the model thread only, one step at a time."""

from __future__ import annotations

import torch
from llguidance import LLMatcher


class TokenGuide:
    """An llguidance matcher of its own (copied from the compiled constraint's start state)."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.failed = False  # dead-ended: its answer ends now, "grammar_error"

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into `bitmask[row]` (int32 words on the host, one bit
        per token of the tokenizer). A matcher that fails while it computes them fails the
        guide."""
        target = bitmask[row]
        assert bitmask.dtype == torch.int32 and target.is_contiguous() and not target.is_cuda
        assert target.numel() * 32 >= self.vocab_size
        # What llguidance.torch.fill_next_token_bitmask does, without importing that module
        # (it pulls in torch.compile: seconds of start-up for nothing used here).
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)
        if self._matcher.is_error():
            self.failed = True

    def consume(self, token: int) -> None:
        """The token sampled for this request; one the constraint refuses (the end token before
        the grammar is complete, on a dead end) fails the guide."""
        if not self.failed and not self._matcher.consume_token(token):
            self.failed = True

    def fail(self) -> None:
        self.failed = True

    @property
    def error(self) -> str:
        return self._matcher.get_error()
