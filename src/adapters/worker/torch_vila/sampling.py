"""Token choice for one request: greedy, or temperature with top-k / top-p, per-request seed.

Everything stays on the device: the sampled id is a 0-d tensor, so sampling adds no host sync.
"""

from __future__ import annotations

import torch

from vilaserve.domain.shared.generation import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self._greedy = params.is_greedy
        self._temperature = params.temperature
        self._top_k = params.top_k
        self._top_p = params.top_p
        self._generator: torch.Generator | None = None
        if not self._greedy:
            self._generator = torch.Generator(device=device)
            if params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(params.seed % 2**64)

    @property
    def is_greedy(self) -> bool:
        return self._greedy

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] (fp32) -> the chosen token id as a 0-d int64 tensor."""
        if self._greedy:
            return logits.argmax(dim=-1)
        scaled = logits / self._temperature
        if self._top_k > 0 and self._top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self._top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if self._top_p < 1.0:
            probs = _nucleus(probs, self._top_p)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(0)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
