"""The seq2seq self-attention mask of UNILM/UNIMO generation over one [source; target] sequence.

Source positions (the image, plus an optional caption prefix) attend bidirectionally among
themselves and never to the target; target positions attend to the whole source and to target
positions up to and including their own (left to right). Padding keys are masked for everyone.
"""

from __future__ import annotations

import torch


def seq2seq_attention_mask(key_mask: torch.Tensor, n_source: int | torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask B×1×L×L (True = may attend) for sequences whose first `n_source`
    positions (an int, or one per row as a B tensor) are the source.

    query q may see key k iff k is a real key and (k is in the source or k ≤ q): a source query
    q < S sees k ≤ q < S or k < S, i.e. the source only; a target query sees the source and the
    target up to itself.
    """
    b, n = key_mask.shape
    device = key_mask.device
    pos = torch.arange(n, device=device)
    source = torch.as_tensor(n_source, device=device).reshape(-1, 1, 1)  # 1 or B, ×1×1
    in_source = pos[None, None, :] < source  # key k in the source: B×1×L
    causal = pos[None, :, None] >= pos[None, None, :]  # k ≤ q: 1×L×L
    allowed = (in_source | causal) & key_mask.bool()[:, None, :]
    return allowed.expand(b, n, n)[:, None]
