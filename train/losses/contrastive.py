"""CLIP's symmetric InfoNCE over the batch's image-text similarity matrix.

The temperature is learned as log(1/τ) (init τ = 0.07) and the scale 1/τ is clamped to ≤ 100 so
the logits cannot grow without bound (CLIP). Under torch.distributed every rank's embeddings are
gathered with gradients, so the negatives are the global batch and the loss equals the
single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of its slot's gradient
    (every rank's loss saw this rank's rows as negatives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def gather_features(
    image: torch.Tensor, text: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(all images, all texts, offset of this rank's rows) across the ranks of `group` (default:
    all; a tensor-parallel layout passes its data-parallel group); identity when alone. Every
    rank needs the same batch size."""
    rank, world = _world(group)
    if world == 1:
        return image, text, 0
    images = _AllGather.apply(image, group).flatten(0, 1)
    texts = _AllGather.apply(text, group).flatten(0, 1)
    return images, texts, rank * image.shape[0]


class ContrastiveLoss(nn.Module):
    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        # The ranks whose batches are negatives for each other; set from outside when parallel
        # layouts other than plain data parallelism are applied.
        self.group: dist.ProcessGroup | None = None

    def scale(self) -> torch.Tensor:
        """1/τ after clamping (the gradient stops while it sits at the clamp, as in CLIP)."""
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image and text embeddings B×E (normalized here) → the mean of both directions' CE."""
        img = F.normalize(image.float(), dim=-1)
        txt = F.normalize(text.float(), dim=-1)
        all_img, all_txt, offset = gather_features(img, txt, self.group)
        s = self.scale()
        labels = torch.arange(img.shape[0], device=img.device) + offset
        loss_i2t = F.cross_entropy(s * img @ all_txt.t(), labels)
        loss_t2i = F.cross_entropy(s * txt @ all_img.t(), labels)
        return (loss_i2t + loss_t2i) / 2
