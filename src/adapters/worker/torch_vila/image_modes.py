"""How one picture becomes tiles for the tower, and the tower's features become LLM positions.

Three modes cover the family:
- `SingleTileMode`: one tile per picture (VILA-1.5, S2 inside the tower, InternViT, LLaVA);
  every picture takes the same number of positions.
- `DynamicS2Mode` (NVILA): a picture alone in its request is cut at three scales (5 + i*j
  tiles), the scales are merged on the last scale's tile grid, projected per tile and laid back
  out as one image: 256*i*j positions for NVILA-8B, then the "\\n" embedding. Pictures that share
  a request are squashed to one tile and their features repeated over the scales' channels.
- `DynamicTilesMode` (NVILA-Lite): InternVL-style tiles plus a thumbnail, each projected on its
  own and followed by "\\n" twice (the image encoder's end token and the prompt's).

Preparation runs on a worker thread (PIL + numpy); assembly on the model thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import nn

from vilaserve.adapters.worker.torch_vila import tiling
from vilaserve.adapters.worker.torch_vila.image_processing import (
    ImagePreprocessor,
    ImageProcessorConfig,
)


@dataclass(frozen=True)
class PreparedImage:
    """Pixels of one picture's tiles [tiles, 3, S, S] (float32) and, for a dynamic-S2 picture
    cut on its own, the last scale's tile grid (rows, cols)."""

    pixels: torch.Tensor
    block: tuple[int, int] | None = None

    @property
    def tiles(self) -> int:
        return int(self.pixels.shape[0])


class _EndTokens:
    """The LLM embedding rows that follow each picture ("\\n" for NVILA), or none."""

    def __init__(self, end_embedding: torch.Tensor | None) -> None:
        self.rows = end_embedding
        self.count = 0 if end_embedding is None else int(end_embedding.shape[0])

    def append(self, positions: torch.Tensor, times: int = 1) -> torch.Tensor:
        if self.rows is None:
            return positions
        end = self.rows.to(device=positions.device, dtype=positions.dtype)
        return torch.cat([positions, *([end] * times)])


class ImageMode(ABC):
    # True when a picture's preparation depends on whether it is alone in its request, so a
    # cached embedding is only valid for the same case.
    depends_on_count = False

    def __init__(
        self, preprocessor: ImagePreprocessor, end_embedding: torch.Tensor | None = None
    ) -> None:
        """`preprocessor`: the tower's own (one square tile); `end_embedding`: LLM embedding
        rows that follow each picture (NVILA's "\\n")."""
        self.preprocessor = preprocessor
        self.tile_size = preprocessor.output_size[0]
        self.end = _EndTokens(end_embedding)

    @property
    def tag(self) -> str:
        """Everything about the preprocessing that changes the embeddings (cache key salt)."""
        return f"{type(self).__name__}{self.preprocessor.config!r}{self.preprocessor.aspect_ratio}"

    @abstractmethod
    def prepare(self, image: Image.Image, alone: bool) -> PreparedImage: ...

    @abstractmethod
    def assemble(
        self, features: Sequence[torch.Tensor], items: Sequence[PreparedImage], projector: nn.Module
    ) -> list[torch.Tensor]:
        """Per picture: its tiles' tower features [tiles, T, C] -> positions [P, H]."""

    @abstractmethod
    def max_positions(self) -> int:
        """The most LLM positions one picture can take (what `count_token` assumes)."""


class SingleTileMode(ImageMode):
    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        positions: int,
        end_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__(preprocessor, end_embedding)
        self.positions = positions + self.end.count

    def prepare(self, image: Image.Image, alone: bool) -> PreparedImage:
        return PreparedImage(self.preprocessor([image]))

    def assemble(
        self, features: Sequence[torch.Tensor], items: Sequence[PreparedImage], projector: nn.Module
    ) -> list[torch.Tensor]:
        # One projector call for the whole batch: every picture has the same shape here.
        projected = projector(torch.cat(list(features)))
        return [self.end.append(rows) for rows in projected.unbind(0)]

    def max_positions(self) -> int:
        return self.positions


class DynamicS2Mode(ImageMode):
    depends_on_count = True

    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        scales: Sequence[int],
        resize_index: int,
        max_tiles: int,
        tokens_per_tile: int,
        end_embedding: torch.Tensor | None,
    ) -> None:
        """`tokens_per_tile`: positions the projector makes of one last-scale tile."""
        super().__init__(preprocessor, end_embedding)
        self.scales = tuple(scales)
        self.resize_index = resize_index
        self.max_tiles = max_tiles
        self.tokens_per_tile = tokens_per_tile

    @property
    def tag(self) -> str:
        return f"{super().tag}{self.scales}{self.resize_index}{self.max_tiles}"

    def prepare(self, image: Image.Image, alone: bool) -> PreparedImage:
        if not alone:
            return PreparedImage(self.preprocessor([image]))
        tiles, block = tiling.dynamic_s2_tiles(
            image, self.tile_size, self.scales, max_tiles=self.max_tiles
        )
        # Tiles are already tile_size square: the processor only rescales and normalises them.
        return PreparedImage(self.preprocessor(tiles), block)

    def assemble(
        self, features: Sequence[torch.Tensor], items: Sequence[PreparedImage], projector: nn.Module
    ) -> list[torch.Tensor]:
        out = []
        for tiles, item in zip(features, items, strict=True):
            if item.block is None:
                widened = tiling.repeat_for_scales(tiles, len(self.scales))
                positions = projector(widened)[0]
            else:
                merged = tiling.merge_features_for_dynamic_s2(
                    tiles, item.block, self.scales, self.resize_index
                )
                grid = tiling.output_block_size(item.block, self.scales, self.resize_index)
                positions = tiling.merge_tile_tokens(projector(merged), grid)
            out.append(self.end.append(positions))
        return out

    def max_positions(self) -> int:
        return self.max_tiles * self.tokens_per_tile + self.end.count


class DynamicTilesMode(ImageMode):
    depends_on_count = True

    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        min_tiles: int,
        max_tiles: int,
        tokens_per_tile: int,
        end_embedding: torch.Tensor | None,
    ) -> None:
        super().__init__(preprocessor, end_embedding)
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.tokens_per_tile = tokens_per_tile

    @property
    def tag(self) -> str:
        return f"{super().tag}{self.min_tiles}{self.max_tiles}"

    def prepare(self, image: Image.Image, alone: bool) -> PreparedImage:
        if not alone:
            return PreparedImage(self.preprocessor([image]))
        tiles = tiling.dynamic_tiles(
            image, self.tile_size, self.min_tiles, self.max_tiles, use_thumbnail=True
        )
        # block marks "tiled": each tile then carries the prompt's "\n" too (see assemble).
        return PreparedImage(self.preprocessor(tiles), (len(tiles), 1))

    def assemble(
        self, features: Sequence[torch.Tensor], items: Sequence[PreparedImage], projector: nn.Module
    ) -> list[torch.Tensor]:
        out = []
        for tiles, item in zip(features, items, strict=True):
            projected = projector(tiles)  # [tiles, t, H]
            if item.block is None:
                out.append(self.end.append(projected[0]))
                continue
            # VILA turns the prompt's one <image> into "<image>\n" per tile: each tile is its
            # features, the encoder's "\n", then the prompt's "\n".
            out.append(torch.cat([self.end.append(tile, times=2) for tile in projected]))
        return out

    def max_positions(self) -> int:
        tiles = self.max_tiles + (1 if self.max_tiles > 1 else 0)
        return tiles * (self.tokens_per_tile + 2 * self.end.count)


def squash_config(config: ImageProcessorConfig, side: int) -> ImageProcessorConfig:
    """The processor config resized to `side` x `side` (S2: the largest scale)."""
    crop = (side, side) if config.crop_size is not None else None
    return replace(config, size=(side, side), shortest_edge=None, crop_size=crop)
