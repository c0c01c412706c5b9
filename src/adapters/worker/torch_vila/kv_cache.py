"""The decoder's key/value storage, one preallocated tensor per layer for keys and values."""

from __future__ import annotations

import torch
from torch import Tensor

from vilaserve.adapters.worker.cpu_kernels.decoder import CachePointers


class KVCache:
    """Per-layer key/value storage [rows, kv_heads, max_len, head_dim], allocated once.

    One row per sequence: a single request's cache has one row; the engine's pool has
    `num_cache_rows`, each holding a running sequence or a prefix kept for reuse.
    `Llama.forward` writes new positions into it in place; nothing is reallocated per step.
    Create it with `Llama.new_cache`.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        # Uninitialised: attention reads only the positions a row has written, and on the CPU
        # untouched pages stay unallocated, so a large pool costs memory only as it fills.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._native: CachePointers | None = None

    @classmethod
    def _of(cls, keys: list[Tensor], values: list[Tensor]) -> KVCache:
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache._native = keys, values, None
        return cache

    def row(self, index: int) -> KVCache:
        """Row `index` as a one-row cache sharing this one's storage (one sequence's prefill)."""
        return KVCache._of(
            [k[index : index + 1] for k in self.keys], [v[index : index + 1] for v in self.values]
        )

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position of one row takes over all layers, keys and values."""
        per_layer = self.keys[0][0, :, 0].numel() * self.keys[0].element_size()
        return 2 * len(self.keys) * per_layer

    def native_pointers(self) -> CachePointers:
        """The buffers' addresses for the native decoder, gathered on first use."""
        if self._native is None:
            self._native = CachePointers.of(self.keys, self.values)
        return self._native

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(
        self, layer: int, start_pos: int, keys: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Writes [B, kv_heads, T, D] at start_pos; returns views of positions [0, start_pos+T)."""
        end = start_pos + keys.shape[2]
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        layer_keys[:, :, start_pos:end] = keys
        layer_values[:, :, start_pos:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

    def update_row(
        self, layer: int, row: int, start_pos: int, keys: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`update` for one row of the pool: writes [1, kv_heads, T, D] at start_pos of row
        `row`; returns views [1, kv_heads, start_pos + T, D] of that row."""
        end = start_pos + keys.shape[2]
        layer_keys = self.keys[layer][row : row + 1]
        layer_values = self.values[layer][row : row + 1]
        layer_keys[:, :, start_pos:end] = keys
        layer_values[:, :, start_pos:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]
