"""A torchvision ResNet as a pixel feature extractor: the stem and the first `stages` residual
stages, returning the feature map (no pooling, no classifier) — Pixel-BERT's CNN.

Any torchvision ResNet family model by name (resnet18 … resnet152, resnext*, wide_resnet*),
built with `weights=None` (nothing is downloaded; load torchvision weights into `.net` with its
own names if you have them). `blocks` instead builds a BasicBlock ResNet with that many blocks
per stage, e.g. (1, 1, 1, 1) for CPU tests; `stages` < 4 truncates it, so small images still
leave a feature map worth sampling (a 64 px image is 2×2 after four stages, 8×8 after two).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

FAMILIES = ("resnet", "resnext", "wide_resnet")


def resnet_names() -> list[str]:
    """The torchvision ResNet-family builders available here."""
    return sorted(
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(FAMILIES)
    )


class ResNetFeatures(nn.Module):
    def __init__(
        self,
        name: str = "resnet50",
        blocks: tuple[int, int, int, int] | None = None,
        stages: int = 4,
    ):
        super().__init__()
        if not 1 <= stages <= 4:
            raise ValueError(f"a ResNet has 1 to 4 stages, not {stages}")
        net: ResNet
        if blocks is not None:
            if len(blocks) != 4 or min(blocks) < 1:
                raise ValueError(f"blocks must be four positive counts, not {blocks}")
            net = ResNet(BasicBlock, list(blocks))
        elif name in resnet_names():
            net = torchvision.models.get_model(name, weights=None)
        else:
            raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(resnet_names())}")
        # Drop what the feature map does not use: unused parameters would get no gradient (and
        # DDP would wait for them).
        del net.avgpool, net.fc
        for i in range(stages + 1, 5):
            delattr(net, f"layer{i}")
        self.net = net
        self.stages = stages
        last = getattr(net, f"layer{stages}")[-1]
        self.out_channels: int = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.stride: int = 4 * 2 ** (stages - 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×H×W → B×C×H/stride×W/stride."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(pixels))))
        for i in range(1, self.stages + 1):
            x = getattr(n, f"layer{i}")(x)
        return x
