"""Multi-head attention on `F.scaled_dot_product_attention`, self or cross.

q, k, v and the output projection are four plain `nn.Linear`s so that tensor parallelism can
shard q/k/v column-wise and the output row-wise from outside (torchtitan style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(
    key_mask: torch.Tensor | None,
    causal: bool = False,
    query_len: int | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask (True = may attend), broadcastable to B×heads×Lq×Lk.

    key_mask: B×Lk, 1/True for real keys. A causal mask is added for decoder-style text towers
    (CLIP). Returns None when nothing is masked so SDPA can take its fastest kernel.
    """
    mask = None
    if key_mask is not None:
        km = key_mask.bool()
        if not bool(km.all()):
            mask = km[:, None, None, :]
    if causal:
        lk = key_mask.shape[1] if key_mask is not None else query_len
        lq = query_len if query_len is not None else lk
        assert lk is not None and lq is not None, "a causal mask needs a length"
        device = key_mask.device if key_mask is not None else None
        tri = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    return mask


class Attention(nn.Module):
    """Queries from `x`, keys/values from `context` (= x for self-attention).

    `kv_dim` and `inner_dim` let the two streams of a co-attention layer differ in width
    (ViLBERT's 768-d text and 1024-d image streams meet in a 1024-d attention space).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_dim: int | None = None,
        inner_dim: int | None = None,
        out_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = inner_dim or dim
        if inner % heads:
            raise ValueError(f"attention width {inner} does not split into {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, inner, bias=bias)
        self.k = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.v = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.o = nn.Linear(inner, out_dim or dim, bias=bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self._split(self.q(x)), self._split(self.k(ctx)), self._split(self.v(ctx))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, _, n, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, -1))
