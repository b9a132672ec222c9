"""ViLT (Kim et al. 2021): no CNN and no regions — image patches by one linear projection, text
by BERT embeddings, each with a modal-type embedding and a [class] token of its own, in one
pre-LN transformer (ViT's layout, ViT-B/32 sizes in "base").

Tasks, summed on every batch: ITM whose negatives are swapped images (half of the pairs), with
word-patch alignment by optimal transport (IPOT, λ = 0.1, as UNITER's WRA) riding on it, and
MLM with whole-word masking. The masking choices are declared in `masking_defaults` and applied
by the trainer where the run's flags leave them at their defaults. One forward per batch: ITM and
WPA see the MLM-masked caption (ViLT runs a second, unmasked forward for them); the loader masks
every row, matched or not, so a [MASK] tells ITM nothing.

Converted HF `ViltModel` weights reproduce its outputs (train/convert_vilt.py). What differs from
HF: images are fixed-size squares (the loader centre-crops to `image_size`), so there is no
pixel mask, and every patch is kept in raster order at eval; HF samples `max_image_length`
patches and returns them in a random order. `max_image_length` here samples patches in
training only, as the original ViLT did (200 of up to 240 patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlforge.train.blocks import (
    PatchEmbeddings,
    Pooler,
    TextEmbeddings,
    TransformerEncoder,
    attention_mask,
    sample_tokens,
)
from vlforge.train.losses import (
    ITMHead,
    MLMHead,
    itm_score,
    optimal_transport_distance,
    wra_loss,
)
from vlforge.train.recipes.base import (
    SMALL_INIT_STD,
    Recipe,
    RecipeConfig,
    itm_task_loss,
    mlm_task_loss,
    require,
)
from vlforge.train.recipes.registry import register_recipe

TEXT_TYPE, IMAGE_TYPE = 0, 1  # modal-type ids


@dataclass
class ViltConfig(RecipeConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"itm": 1.0, "mlm": 1.0})
    task_mode: str = "sum"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_len: int = 40  # ViLT's max_text_len
    type_vocab: int = 2  # BERT token types of the text side
    modality_types: int = 2  # text, image (a third for NLVR2's second image)
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_id: int | None = 0
    image_size: int = 384
    patch_size: int = 32
    max_image_length: int = -1  # patches sampled per image in training; -1 keeps all
    wpa_weight: float = 0.1  # ViLT's itm_wpa_loss factor: WPA on every ITM batch; 0 turns it off
    ot_beta: float = 0.5
    ot_iterations: int = 50


@register_recipe("vilt")
class Vilt(Recipe):
    name = "vilt"
    inputs = frozenset({"text", "pixels"})
    # WPA is no task of its own: it rides on ITM batches (their negatives are its negatives).
    supported_tasks = frozenset({"itm", "mlm"})
    sizes: ClassVar[dict[str, ViltConfig]] = {  # type: ignore[assignment]
        "small": ViltConfig(
            hidden=64,
            layers=2,
            heads=4,
            mlp=128,
            image_size=64,
            patch_size=16,
            dropout=0.0,
            attn_dropout=0.0,
            init_std=SMALL_INIT_STD,
        ),  # fmt: skip
        "base": ViltConfig(),
    }
    # ViLT's data choices (the trainer applies them where the run's flags are at their defaults):
    # whole-word MLM, and ITM negatives that are all image swaps, half of the pairs.
    masking_defaults: ClassVar[dict[str, Any]] = {
        "mlm_mode": "word",
        "itm_image_swap": 1.0,
        "itm_neg_ratio": 0.5,
    }

    def __init__(self, cfg: ViltConfig):
        super().__init__(cfg)
        self.cfg: ViltConfig = cfg
        self.image_size = cfg.image_size
        self.loss_weights = {"wpa": cfg.wpa_weight}
        h, eps = cfg.hidden, cfg.eps
        self.text = TextEmbeddings(
            cfg.vocab_size, h, cfg.max_len, cfg.type_vocab, eps=eps, dropout=cfg.dropout,
            pad_id=cfg.pad_id,
        )  # fmt: skip
        self.image = PatchEmbeddings(cfg.image_size, cfg.patch_size, h, dropout=cfg.dropout)
        self.modality = nn.Embedding(cfg.modality_types, h)
        self.encoder = TransformerEncoder(
            cfg.layers, h, cfg.heads, cfg.mlp, act=cfg.act, norm_first=True, eps=eps,
            dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
        )  # fmt: skip
        self.norm = nn.LayerNorm(h, eps=eps)
        self.pooler = Pooler(h)
        self.mlm = MLMHead(h, cfg.vocab_size, cfg.act, eps, tie_to=self.text.word)
        self.itm = ITMHead(h)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.image.reset_parameters(self.cfg.init_std)

    # -- the encoder -------------------------------------------------------------------------

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(embeddings B×(L+1+P)×H, key mask, L): text ([CLS] … [SEP]) then the image [class]
        token and its patches, each with its modal-type embedding."""
        require(batch, ["input_ids", "pixel_values"], "vilt")
        ids = batch["input_ids"]
        text = self.text(ids, batch.get("token_type_ids"))
        text = text + self.modality.weight[TEXT_TYPE]
        image = self.image(batch["pixel_values"])
        if self.training and self.cfg.max_image_length > 0:
            patches, _ = sample_tokens(image[:, 1:], self.cfg.max_image_length)
            image = torch.cat([image[:, :1], patches], 1)
        image = image + self.modality.weight[IMAGE_TYPE]
        text_mask = batch.get("attention_mask", torch.ones_like(ids)).to(torch.long)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return torch.cat([text, image], 1), torch.cat([text_mask, image_mask], 1), ids.shape[1]

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(final hidden states after ViLT's last LayerNorm, key mask, text length L)."""
        x, mask, n_text = self.embed(batch)
        return self.norm(self.encoder(x, attention_mask(mask))), mask, n_text

    # -- inference entry points (eval) -------------------------------------------------------

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, _ = self.encode(batch)
        return itm_score(self.itm(self.pooler(hidden)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    # -- losses ------------------------------------------------------------------------------

    def wpa_distance(self, hidden: torch.Tensor, mask: torch.Tensor, n_text: int) -> torch.Tensor:
        """B optimal-transport distances between the words and the patches, as ViLT: the text
        [CLS] and [SEP] and the image [class] token are left out (they summarise, not align)."""
        txt_mask = mask[:, :n_text].clone()
        last = txt_mask.sum(1) - 1  # [SEP]: the last real token
        txt_mask[torch.arange(len(last), device=mask.device), last] = 0
        txt_mask[:, 0] = 0
        img_mask = mask[:, n_text:].clone()
        img_mask[:, 0] = 0
        return optimal_transport_distance(
            hidden[:, :n_text], hidden[:, n_text:], txt_mask, img_mask,
            beta=self.cfg.ot_beta, iterations=self.cfg.ot_iterations,
        )  # fmt: skip

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, mask, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        wanted = set(tasks)
        if "mlm" in wanted:
            out["mlm"] = mlm_task_loss(self.mlm, hidden[:, :n_text], batch)
        if "itm" in wanted:
            out["itm"] = itm_task_loss(self.itm, self.pooler(hidden), batch)
            if self.cfg.wpa_weight > 0:
                dist = self.wpa_distance(hidden, mask, n_text)
                out["wpa"] = wra_loss(dist, batch["itm_labels"])
        return out
