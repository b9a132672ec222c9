"""DALL-E's sparse attention (Ramesh et al. 2021, §2.2, Appendix B.1 and Figure 11) as boolean SDPA
masks over [text tokens; image tokens in raster order], and the decoder that cycles them.

Every mask is causal. Text tokens attend to all earlier text tokens; every image token attends to
all text tokens and to the earlier image tokens its pattern selects (and to itself):

- row: the previous `W` image tokens in raster order, so the window ends at the token in the same
  column of the previous row (Figure 11a: "each image token attends to the previous 5 image
  tokens" on a 4-wide grid, counting itself);
- column: the tokens of the same column in this and earlier rows (Figure 11b; the paper
  transposes the image states to use mask (c) for speed — same attention, we keep raster order);
- conv: a causal k×k neighbourhood centred on the token's column (Figure 11d, 11×11 in the
  paper). The paper's conv pattern wraps around row ends like the row mask; ours is clipped at
  the image border, which is what a 2-D convolution sees.

Layer i (0-based) uses column when i % 4 == 1, else row, and the last layer conv: the paper's
"column attention mask in every (i − 2) mod 4 = 0 layer [i 1-based], the row attention mask in
the other layers, and the convolutional attention mask in the last layer".
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.transformer import TransformerLayer

KINDS = ("row", "column", "conv")


def _image_pattern(kind: str, height: int, width: int, kernel: int) -> torch.Tensor:
    """N×N bool over image tokens (N = height·width): query i may attend key j (before causality)."""
    n = height * width
    idx = torch.arange(n)
    r, c = idx // width, idx % width
    dr = r[:, None] - r[None, :]  # query row − key row
    dc = c[:, None] - c[None, :]
    if kind == "row":
        back = idx[:, None] - idx[None, :]
        return (back >= 0) & (back <= width)
    if kind == "column":
        return dc == 0
    if kind == "conv":
        half = kernel // 2
        return (dr >= 0) & (dr <= half) & (dc.abs() <= half)
    raise ValueError(f"sparse attention kind must be one of {KINDS}, not {kind!r}")


def sparse_mask(kind: str, text_len: int, height: int, width: int, kernel: int = 3) -> torch.Tensor:
    """L×L bool (True = may attend), L = text_len + height·width; causal in every case."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"conv kernel must be odd and positive, not {kernel}")
    n = height * width
    total = text_len + n
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:, :text_len] = True  # everything sees the text (causality trims the text rows below)
    mask[text_len:, text_len:] = _image_pattern(kind, height, width, kernel)
    return mask & torch.ones(total, total, dtype=torch.bool).tril()


def layer_kinds(depth: int) -> list[str]:
    """The paper's pattern for a `depth`-layer decoder: row, column, row, row, …, conv last."""
    kinds = ["column" if i % 4 == 1 else "row" for i in range(depth)]
    kinds[-1] = "conv"
    return kinds


class SparseDecoder(nn.Module):
    """Pre-LN decoder layers (shared `TransformerLayer`, so MoE may replace their `MLP`s), each
    with its sparse mask, then a final LayerNorm."""

    def __init__(
        self,
        depth: int,
        dim: int,
        heads: int,
        mlp_dim: int,
        text_len: int,
        height: int,
        width: int,
        kernel: int = 3,
        act: str = "gelu",
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("a sparse decoder needs at least one layer")
        self.kinds = layer_kinds(depth)
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim,
                heads,
                mlp_dim,
                act=act,
                norm_first=True,
                eps=eps,
                dropout=dropout,
                attn_dropout=dropout,
            )  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        # One mask per kind, not saved with the weights (they follow from the config).
        for kind in KINDS:
            self.register_buffer(
                f"mask_{kind}", sparse_mask(kind, text_len, height, width, kernel), persistent=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×L×dim with L ≤ text_len + height·width (a prefix, as in sampling) → B×L×dim."""
        n = x.shape[1]
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            mask = getattr(self, f"mask_{kind}")[:n, :n]
            x = layer(x, mask)
        return self.norm(x)
