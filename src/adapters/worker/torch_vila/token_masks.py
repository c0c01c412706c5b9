"""A step's token masks for its constrained rows: filled on the host by each row's guide (one
bit per token), then applied to the logits before the sampling: every forbidden token's logit
becomes -inf, the others are left exactly as they were.

On the CPU each mask byte picks its 8 additive penalties (0 or -inf) from a 256-row table and
the rows are added in one go: several times faster there than a boolean `masked_fill_`. On a
GPU the words are copied once per step and unpacked by a few tensor ops on the device.

Tokens the tokenizer does not have (logits wider than its vocabulary: padded embeddings) are
never allowed in a constrained row. A row whose guide allows nothing is left unmasked and its
guide fails: its sampled token only ends the answer ("grammar_error"), and no row of the step
ever samples from nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vilaserve.adapters.worker.torch_vila.token_guide import TokenGuide

BITS_PER_WORD = 32
ALL_ALLOWED = -1  # an int32 word with every bit set

# Row b: the penalties of the 8 tokens whose bits are byte b (little-endian bit order).
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
BYTE_PENALTIES = np.where(_BYTE_BITS == 1, 0.0, -np.inf).astype(np.float32)


class TokenMasks:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        """`max_rows`: the most rows a step samples (the KV pool's rows)."""
        words = (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD
        self._on_cpu = device.type == "cpu"
        # Pinned on a GPU host: the one copy per step is a plain DMA.
        self._host = torch.zeros((max_rows, words), dtype=torch.int32, pin_memory=not self._on_cpu)
        self._shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)
        self._device = device
        self.vocab_size = vocab_size

    def apply(self, logits: torch.Tensor, guided: Sequence[tuple[int, TokenGuide]]) -> None:
        """Masks `logits` [rows, width] in place at the rows `guided` names, each by its
        guide."""
        words = self._fill(guided)
        rows = None  # every row constrained (then in order): no gather, no scatter
        if len(guided) < logits.shape[0]:
            rows = torch.tensor([row for row, _ in guided], dtype=torch.int64).to(self._device)
        width = logits.shape[-1]
        if self._on_cpu:
            added = penalties(words.numpy(), width, logits.dtype)
            if rows is None:
                logits.add_(added)
            else:
                logits.index_add_(0, rows, added)
            return
        on_device = words.to(self._device, non_blocking=True)
        forbidden = forbidden_tokens(on_device, width, self._shifts)
        if rows is None:
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            logits[rows] = logits[rows].masked_fill_(forbidden, float("-inf"))

    def _fill(self, guided: Sequence[tuple[int, TokenGuide]]) -> torch.Tensor:
        """Each guide's words, in `guided` order; a guide that allows nothing fails, and its
        row allows everything (its token is no answer)."""
        host = self._host[: len(guided)]
        for index, (_, guide) in enumerate(guided):
            guide.fill(host, index)
        words = host.numpy()
        for index in np.flatnonzero(~words.any(axis=1)):
            guided[index][1].fail()
        for index, (_, guide) in enumerate(guided):
            if guide.failed:
                words[index] = ALL_ALLOWED
        return host


def forbidden_tokens(words: torch.Tensor, width: int, shifts: torch.Tensor) -> torch.Tensor:
    """[rows, width] booleans where `words` is: true where a token may not come (ids past
    the words too). `shifts`: 0..31 as int32 on the words' device."""
    forbidden = (((words.unsqueeze(-1) >> shifts) & 1) == 0).view(words.shape[0], -1)
    if forbidden.shape[1] >= width:
        return forbidden[:, :width]
    return torch.nn.functional.pad(forbidden, (0, width - forbidden.shape[1]), value=True)


def penalties(words: np.ndarray, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width]: 0 where a token is allowed, -inf elsewhere (ids past the words too)."""
    table = np.take(BYTE_PENALTIES, words.view(np.uint8), axis=0).reshape(words.shape[0], -1)
    if table.shape[1] < width:
        table = np.pad(table, ((0, 0), (0, width - table.shape[1])), constant_values=-np.inf)
    else:
        table = np.ascontiguousarray(table[:, :width])
    added = torch.from_numpy(table)
    return added if dtype == torch.float32 else added.to(dtype)
