"""Region embeddings: detector features + box geometry → the transformer's width.

UNITER LayerNorms each part before the sum (`part_norm=True`) and adds the segment embedding of
the image; ViLBERT sums the two projections and LayerNorms once.

With `part_norm`, a region whose features the data side zeroed for masking would reach a
LayerNorm as a constant vector: its output is 0/√eps and its gradient ~1/√eps (1e6 with BERT's
eps). UNITER avoids that with a learned mask embedding added to the masked features; so do we
(`mask_embedding=True`), on every all-zero region — the 10% kept ones stay unmarked. Every,
not only those `masked` names: the data side masks the regions of unmatched rows too but leaves
them out of `mrm_mask` (their losses do not count), and those would reach the norm unmarked.
"""

from __future__ import annotations

import torch
from torch import nn


def prepend_global_region(
    feats: torch.Tensor, geom: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViLBERT's [IMG] token: the mean of the real regions' features with the whole image's box,
    put first so the image stream has a token to pool.

    geom's encodings all start with x1, y1, x2, y2 and the rest (w, h, area) are 1 for the whole
    normalized image, so the whole-image geometry is (0, 0, 1, 1, 1, ...).
    """
    m = mask.to(feats.dtype).unsqueeze(-1)
    mean = (feats * m).sum(1) / m.sum(1).clamp(min=1.0)
    whole = torch.ones_like(geom[:, :1])
    whole[..., :2] = 0
    ones = torch.ones_like(mask[:, :1])
    return (
        torch.cat([mean[:, None], feats], 1),
        torch.cat([whole, geom], 1),
        torch.cat([ones, mask], 1),
    )


class RegionEmbeddings(nn.Module):
    def __init__(
        self,
        feat_dim: int,
        geom_dim: int,
        dim: int,
        part_norm: bool = False,
        eps: float = 1e-12,
        dropout: float = 0.0,
        mask_embedding: bool = False,
    ):
        super().__init__()
        self.mask = nn.Parameter(torch.randn(feat_dim) * 0.02) if mask_embedding else None
        self.feat = nn.Linear(feat_dim, dim)
        self.geom = nn.Linear(geom_dim, dim) if geom_dim else None
        self.feat_norm = nn.LayerNorm(dim, eps=eps) if part_norm else nn.Identity()
        self.geom_norm = nn.LayerNorm(dim, eps=eps) if part_norm and geom_dim else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        feats: torch.Tensor,
        geom: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        zeroed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """feats B×R×D, geom B×R×G; `extra` (e.g. a segment embedding) is added before the norm;
        `masked` is accepted for callers that track it; with `mask_embedding` every all-zero
        region is marked whether or not `masked` names it (see the module docstring). `zeroed`
        (B×R bool) names those regions when `feats` no longer shows them (features perturbed
        by adversarial training)."""
        del masked
        if self.mask is not None:
            if zeroed is None:
                zeroed = (feats == 0).all(-1)
            feats = feats + zeroed.unsqueeze(-1).to(feats.dtype) * self.mask.to(feats.dtype)
        x = self.feat_norm(self.feat(feats))
        if self.geom is not None:
            if geom is None:
                raise ValueError("this region embedding needs region_geom")
            x = x + self.geom_norm(self.geom(geom))
        if extra is not None:
            x = x + extra
        return self.drop(self.norm(x))
