"""CLIP's modified ResNet image tower, shrinkable by `width` and `layers`.

Differences from torchvision's ResNet that CLIP made and we keep: a 3-convolution stem with an
average pool, anti-aliased strided convolutions (an average pool before the stride-1 conv), and an
attention pool (the mean feature queries all positions) in place of global average pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.attention import Attention


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Module = nn.Identity()
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        return F.relu(out + self.downsample(x))


class AttentionPool2d(nn.Module):
    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.attn = Attention(dim, heads, out_dim=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # B×HW×C
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.position[None].to(x.dtype)
        return self.attn(x[:, :1], context=x)[:, 0]


class ModifiedResNet(nn.Module):
    def __init__(
        self,
        image_size: int,
        layers: tuple[int, int, int, int],
        width: int,
        heads: int,
        embed_dim: int,
    ):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"the ResNet tower needs a multiple of 32 px, not {image_size}")
        self.image_size = image_size
        half = width // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        blocks: list[nn.Module] = []
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.attnpool = AttentionPool2d(image_size // 32, inplanes, heads, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×H×W → B×embed_dim (not normalized)."""
        return self.attnpool(self.blocks(self.stem(pixels)))
