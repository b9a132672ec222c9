"""UNIMO's cross-modal contrastive learning (CMCL): InfoNCE with several positives per anchor.

For an anchor with candidate scores s_j (cosine × 1/τ) and a set P of positives among them,

    loss = −log( Σ_{j∈P} exp s_j / Σ_j exp s_j ) = logsumexp_j s_j − logsumexp_{j∈P} s_j,

the paper's CMCL equation with multiple positives in the numerator. The candidates of an image
anchor are the batch's captions (its own and those of images retrieved as its positives count as
positives), its TF-IDF-retrieved captions (extra positives) and its scene-graph rewrites (extra
hard negatives); a caption anchor ranks the batch's images the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """logits A×N, positive A×N bool (every row has at least one) → mean over anchors of
    −log(Σ_pos exp / Σ_all exp). Candidates with logit −inf (absent) drop out of both sums."""
    logits = logits.float()
    pos = logits.masked_fill(~positive.bool(), float("-inf"))
    return (torch.logsumexp(logits, -1) - torch.logsumexp(pos, -1)).mean()


def cmcl_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    positive: torch.Tensor,
    scale: torch.Tensor | float,
    extra_text: torch.Tensor | None = None,
    extra_row: torch.Tensor | None = None,
    extra_positive: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the image→text and text→image multi-positive InfoNCE.

    image, text: B×E (normalized here); positive: B×B bool, positive[i, j] when caption j fits
    image i (the diagonal must be set); extra_text: X×E captions owned by one anchor image each
    (`extra_row`, X long) and positive or negative for it (`extra_positive`, X bool). An extra
    caption is a candidate of its own anchor only.
    """
    img = F.normalize(image.float(), dim=-1)
    txt = F.normalize(text.float(), dim=-1)
    pos = positive.bool()
    i2t = scale * img @ txt.t()
    if extra_text is not None and extra_text.shape[0]:
        assert extra_row is not None and extra_positive is not None
        ext = scale * img @ F.normalize(extra_text.float(), dim=-1).t()  # B×X
        own = extra_row[None, :] == torch.arange(img.shape[0], device=img.device)[:, None]
        i2t = torch.cat([i2t, ext.masked_fill(~own, float("-inf"))], 1)
        pos = torch.cat([pos, own & extra_positive.bool()[None, :]], 1)
    loss_i2t = multi_positive_nce(i2t, pos)
    loss_t2i = multi_positive_nce(scale * txt @ img.t(), positive.bool().t())
    return (loss_i2t + loss_t2i) / 2
