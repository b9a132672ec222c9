"""Random token sampling: keep k of a sequence's N visual tokens per example, without
replacement (Pixel-BERT's pixel random sampling, ViLT's `max_image_len` patch sampling).

Training only — eval keeps every token. Sampling regularises (the model cannot lean on any one
pixel) and cuts the sequence the transformer pays for quadratically. Indices come back sorted,
so the kept tokens keep their raster order.
"""

from __future__ import annotations

import torch


def sample_tokens(
    x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B×k×D kept tokens, B×k indices into N) of x (B×N×D); all N when k ≤ 0 or k ≥ N.

    Draws from torch's RNG (or `generator`), which the trainer checkpoints, so a resumed run
    samples the same tokens."""
    b, n, _ = x.shape
    if k <= 0 or k >= n:
        idx = torch.arange(n, device=x.device).expand(b, n)
        return x, idx
    scores = torch.rand(b, n, generator=generator, device=x.device if generator is None else None)
    idx = scores.to(x.device).topk(k, dim=1).indices.sort(dim=1).values
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx
