"""ViT/ViLT patch embeddings: a linear projection of non-overlapping patches (a Conv2d whose
kernel and stride are the patch size), a learned image [class] token in front, and learned
position embeddings over [class] + the patch grid.

Images of another size than the configured one get their grid positions bilinearly resized
(corners aligned, as ViLT and its HF port do), so a run with `--image-size` still works; at the
configured size that resize is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbeddings(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        channels: int = 3,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size, bias=bias)
        self.cls = nn.Parameter(torch.zeros(dim))
        self.position = nn.Embedding(self.grid**2 + 1, dim)
        self.drop = nn.Dropout(dropout)

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def reset_parameters(self, std: float) -> None:
        """The [class] token is a bare parameter: recipes' module-wise init does not reach it."""
        nn.init.normal_(self.cls, std=std)

    def grid_positions(self, rows: int, cols: int) -> torch.Tensor:
        """(rows·cols)×D position embeddings of a rows×cols patch grid, in raster order."""
        grid = self.position.weight[1:]
        if (rows, cols) == (self.grid, self.grid):
            return grid
        d = grid.shape[1]
        spatial = grid.T.reshape(1, d, self.grid, self.grid)
        spatial = F.interpolate(spatial, size=(rows, cols), mode="bilinear", align_corners=True)
        return spatial.reshape(d, rows * cols).T

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×(1 + patches)×D: [class] first, then the patches row by row."""
        if pixels.shape[-1] % self.patch_size or pixels.shape[-2] % self.patch_size:
            raise ValueError(
                f"image of {tuple(pixels.shape[-2:])} px does not split into "
                f"{self.patch_size} px patches"
            )
        x = self.proj(pixels.to(self.proj.weight.dtype))
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = torch.cat([self.position.weight[:1], self.grid_positions(rows, cols)], 0)
        return self.drop(torch.cat([cls, x], 1) + pos[None].to(x.dtype))
