"""DALL-E stage 2 (Ramesh et al. 2021, §2.2): a decoder-only transformer over [caption tokens
padded to a fixed length; the image's dVAE tokens], trained by next-token cross-entropy.

- Text: the corpus tokenizer's ids with learned positions; padding uses a learned embedding per
  text position ("a special padding token unique to each of the 256 text positions"), attended
  to like any token but never predicted.
- Image: the argmax codes of a frozen dVAE (`dvae_ckpt`: a `dvae` run; without it a freshly
  initialised one, with a warning), with learned row and column position embeddings.
- Attention: row, column and convolutional sparse masks cycled over the layers, all causal
  (blocks/sparse_attention.py).
- Tasks: "text_ce" and "image_ce", summed with the paper's weights 1/8 and 7/8 (`tasks`).

`hidden` runs the decoder on any image-token prefix, which is what sampling (train/dalle_sampling.py)
needs; the images are reranked by a CLIP run there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.errors import UserError
from vlforge.train.blocks.sparse_attention import SparseDecoder
from vlforge.train.losses import IGNORE
from vlforge.train.recipes.base import SMALL_INIT_STD, Recipe, RecipeConfig, init_weights, require
from vlforge.train.recipes.dvae import DVAE, DiscreteVAE, reconstruction_metrics
from vlforge.train.recipes.registry import register_recipe


@dataclass
class DalleConfig(RecipeConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"text_ce": 1 / 8, "image_ce": 7 / 8})
    task_mode: str = "sum"
    max_len: int = 256  # text positions: captions are truncated, then padded, to this length
    dim: int = 3968
    layers: int = 64
    heads: int = 62
    mlp: int = 4 * 3968
    act: str = "gelu"
    eps: float = 1e-5
    dropout: float = 0.0
    conv_kernel: int = 11
    # The image tokenizer: a `dvae` run directory (or checkpoint), loaded frozen. Without it a
    # fresh dVAE of the shape below is built (only useful for tests and smoke runs).
    dvae_ckpt: str | None = None
    image_size: int = 256
    grid: int = 32
    codes: int = 8192
    code_dim: int = 512
    dvae_hidden: int = 256
    dvae_res_blocks: int = 2


def load_dvae(path: str) -> DiscreteVAE:
    """The dVAE of a `dvae` run (train/trainer.py `load_for_eval`), frozen, in eval mode."""
    from vlforge.train.trainer import load_for_eval  # late: the trainer builds recipes

    try:
        model, _, _ = load_for_eval(path, "cpu")
    except UserError as exn:
        raise UserError(f"dvae_ckpt: {exn}") from None
    if not isinstance(model, DVAE):
        raise UserError(f"dvae_ckpt {path} is a {getattr(model, 'name', '?')} run, not a dvae run")
    return model.vae


@register_recipe("dalle")
class Dalle(Recipe):
    name = "dalle"
    inputs = frozenset({"text", "pixels"})
    supported_tasks = frozenset({"text_ce", "image_ce"})
    sizes: ClassVar[dict[str, DalleConfig]] = {  # type: ignore[assignment]
        "small": DalleConfig(
            max_len=16,
            dim=64,
            layers=4,
            heads=4,
            mlp=128,
            conv_kernel=3,
            image_size=32,
            grid=8,
            codes=64,
            code_dim=32,
            dvae_hidden=32,
            dvae_res_blocks=1,
            init_std=SMALL_INIT_STD,
        ),
        "base": DalleConfig(),  # the paper's 12B model
    }

    def __init__(self, cfg: DalleConfig):
        super().__init__(cfg)
        self.cfg: DalleConfig = cfg
        if cfg.dvae_ckpt:
            self.dvae = load_dvae(cfg.dvae_ckpt)
            self.fresh_dvae = False
        else:
            warnings.warn(
                "dalle: no dvae_ckpt given; image tokens come from a freshly initialised, frozen "
                "dVAE (train one with `vlforge train --recipe dvae` and pass --set dvae_ckpt=RUN)",
                stacklevel=2,
            )
            self.dvae = DiscreteVAE(
                cfg.image_size, cfg.grid, cfg.codes, cfg.code_dim, cfg.dvae_hidden,
                cfg.dvae_res_blocks,
            )  # fmt: skip
            self.fresh_dvae = True
        self.dvae.requires_grad_(False)
        self.dvae.eval()
        # The image side's shape follows the dVAE (a loaded one overrides the config's).
        self.image_size = self.dvae.image_size
        self.grid, self.codes = self.dvae.grid, self.dvae.codes
        self.text_len = cfg.max_len
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.pad_embed = nn.Embedding(cfg.max_len, cfg.dim)  # one padding token per position
        self.image_embed = nn.Embedding(self.codes, cfg.dim)
        self.row_pos = nn.Embedding(self.grid, cfg.dim)
        self.col_pos = nn.Embedding(self.grid, cfg.dim)
        self.decoder = SparseDecoder(
            cfg.layers, cfg.dim, cfg.heads, cfg.mlp, cfg.max_len, self.grid, self.grid,
            cfg.conv_kernel, cfg.act, cfg.eps, cfg.dropout,
        )  # fmt: skip
        self.text_head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.image_head = nn.Linear(cfg.dim, self.codes)

    def reset_parameters(self) -> None:
        # The transformer gets the config's init; the dVAE keeps its trained (or default) weights.
        for child in self.children():
            if child is not self.dvae:
                init_weights(child, self.cfg.init_std)
        if self.fresh_dvae:
            nn.init.normal_(self.dvae.codebook.weight)

    def train(self, mode: bool = True) -> Dalle:
        super().train(mode)
        self.dvae.eval()  # frozen: its tokens must not depend on the trainer's mode
        return self

    # -- sequence ----------------------------------------------------------------------------

    def fixed_text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both B×max_len: the batch's captions truncated/padded to the fixed length."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        ids, mask = ids[:, : self.text_len], mask[:, : self.text_len]
        pad = self.text_len - ids.shape[1]
        if pad:
            ids, mask = F.pad(ids, (0, pad)), F.pad(mask, (0, pad))
        return ids, mask

    def hidden(
        self, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Decoder states for [fixed-length text; an image-token prefix of any length m]:
        B×(max_len + m)×dim; the state at max_len − 1 + j predicts image token j."""
        pos = torch.arange(self.text_len, device=ids.device)
        text = torch.where(mask[..., None].bool(), self.text_embed(ids), self.pad_embed(pos)[None])
        x = text + self.text_pos(pos)[None]
        m = image_tokens.shape[1]
        if m:
            at = torch.arange(m, device=ids.device)
            img = self.image_embed(image_tokens)
            img = img + self.row_pos(at // self.grid)[None] + self.col_pos(at % self.grid)[None]
            x = torch.cat([x, img], 1)
        return self.decoder(x)

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """B×grid² dVAE codes in raster order."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(
                f"dalle's dVAE tokenizes {self.image_size}-px images, not "
                f"{tuple(pixel_values.shape[-2:])} (leave --image-size unset)"
            )
        return self.dvae.encode(pixel_values).flatten(1)

    def logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(text logits, text targets, image logits, image targets) of teacher forcing."""
        ids, mask = self.fixed_text(batch)
        tokens = self.image_tokens(batch["pixel_values"])
        h = self.hidden(ids, mask, tokens[:, :-1])
        t = self.text_len
        text_targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        return self.text_head(h[:, : t - 1]), text_targets, self.image_head(h[:, t - 1 :]), tokens

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        require(batch, ["input_ids", "pixel_values"], "dalle")
        text_logits, text_targets, image_logits, tokens = self.logits(batch)
        out: dict[str, torch.Tensor] = {}
        if "text_ce" in tasks:
            if bool((text_targets != IGNORE).any()):
                out["text_ce"] = F.cross_entropy(
                    text_logits.flatten(0, 1).float(), text_targets.flatten(), ignore_index=IGNORE
                )
            else:  # one-token captions: nothing to predict, but keep the graph for DDP
                out["text_ce"] = text_logits.sum() * 0.0
        if "image_ce" in tasks:
            out["image_ce"] = F.cross_entropy(image_logits.flatten(0, 1).float(), tokens.flatten())
        return out

    @torch.no_grad()
    def extra_metrics(self, evaluator: Any, samples: list[dict[str, Any]]) -> dict[str, float]:
        """The dVAE's held-out reconstruction error and the caption-conditioned NLL per image
        token (nats) of the held-out pairs."""
        out = reconstruction_metrics(self.dvae, evaluator, samples)
        nll, count = 0.0, 0
        for i in range(0, len(samples), evaluator.bs):
            batch = evaluator._batch(samples[i : i + evaluator.bs], i=i)
            _, _, logits, tokens = self.logits(batch)
            nll += float(
                F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="sum")
            )
            count += tokens.numel()
        out["dalle_image_nll"] = nll / max(1, count)
        out["dalle_image_tokens"] = count
        return out
