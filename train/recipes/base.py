"""What every recipe shares: its declared needs (read by the data side), task dispatch and the
total loss, size configs with overrides, and BERT-style initialization.

Task dispatch follows the papers: `task_mode="sample"` trains one task per batch (the data side
draws it with probabilities ∝ `tasks` and puts it in `batch["task"]`; UNITER), `"sum"` adds every
task's loss weighted by `tasks` on every batch (ViLBERT, CLIP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypeVar

import torch
from torch import nn

from vlforge.train.blocks import RegionEmbeddings, TextEmbeddings, TransformerEncoder
from vlforge.train.losses import MLMHead, itm_loss, masked_select, mlm_loss

# Sizes the trainer reads off the data and passes to every recipe; a recipe without such a field
# (CLIP has no regions) ignores them instead of failing.
DATA_SIZED = frozenset({"region_dim", "num_region_classes"})

C = TypeVar("C", bound="RecipeConfig")

# BERT's 0.02 is sized for 768-wide layers. In the 64-wide "small" configs it leaves attention
# logits near 0, so the cross-modal interaction ITM needs starts on a saddle: measured on the demo
# world (ITM only, batches of 32 from 256 samples), UNITER-small's ITM loss stayed at ln 2 for
# 600 steps at 0.02, left it after ~400 steps at 0.1 and after ~100 at 0.2 (0.20 by step 800).
SMALL_INIT_STD = 0.2


@dataclass
class RecipeConfig:
    vocab_size: int = 30522
    tasks: dict[str, float] = field(default_factory=dict)
    task_mode: str = "sum"
    init_std: float = 0.02


@dataclass
class RegionTextConfig(RecipeConfig):
    """What every BERT-based region recipe shares: a BERT-base text side and detector regions
    (2048-d Visual Genome features, 1600 classes + background). Recipes override what differs."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_len: int = 512
    type_vocab: int = 2
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_id: int = 0
    region_dim: int = 2048
    geometry: int = 0
    num_region_classes: int = 1601


# The "small" size every single-stream region recipe shares (64-wide, 2 layers); recipes add or
# override what differs, e.g. `InterbertConfig(**SMALL_REGION_TEXT | {"layers": 1})`.
SMALL_REGION_TEXT: dict[str, Any] = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "mlp": 128,
    "max_len": 128,
    "region_dim": 64,
    "num_region_classes": 32,
    "dropout": 0.0,
    "attn_dropout": 0.0,
    "init_std": SMALL_INIT_STD,
}


class TextEncoderConfig(Protocol):
    """The BERT fields the builders below read: a `RegionTextConfig`, or a config with the same
    text-side fields (Pixel-BERT's)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def mlp(self) -> int: ...
    @property
    def max_len(self) -> int: ...
    @property
    def type_vocab(self) -> int: ...
    @property
    def act(self) -> str: ...
    @property
    def eps(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def attn_dropout(self) -> float: ...
    @property
    def pad_id(self) -> int | None: ...


# Builders of the blocks BERT-based recipes share, configured by the recipe's config. Each builds
# one module where the recipe calls it, so a recipe's construction order (and with it the random
# init for a seed) is the order of its calls.


def text_embeddings(cfg: TextEncoderConfig) -> TextEmbeddings:
    """BERT's word + position + segment embeddings, `hidden` wide."""
    return TextEmbeddings(
        cfg.vocab_size, cfg.hidden, cfg.max_len, cfg.type_vocab, eps=cfg.eps, dropout=cfg.dropout,
        pad_id=cfg.pad_id,
    )  # fmt: skip


def region_embeddings(
    cfg: RegionTextConfig, dim: int | None = None, **options: bool
) -> RegionEmbeddings:
    """Regions (`region_dim` features + `geometry`-d boxes) projected to `dim` (default `hidden`);
    `options`: RegionEmbeddings' part_norm / mask_embedding."""
    return RegionEmbeddings(
        cfg.region_dim, cfg.geometry, cfg.hidden if dim is None else dim, eps=cfg.eps,
        dropout=cfg.dropout, **options,
    )  # fmt: skip


def transformer_encoder(cfg: TextEncoderConfig, layers: int | None = None) -> TransformerEncoder:
    """`layers` (default `cfg.layers`) BERT layers, `hidden` wide."""
    return TransformerEncoder(
        cfg.layers if layers is None else layers, cfg.hidden, cfg.heads, cfg.mlp, act=cfg.act,
        eps=cfg.eps, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
    )  # fmt: skip


def mlm_head(cfg: TextEncoderConfig, text: TextEmbeddings) -> MLMHead:
    """BERT's MLM head over `hidden`, its decoder tied to `text`'s word embeddings."""
    return MLMHead(cfg.hidden, cfg.vocab_size, cfg.act, cfg.eps, tie_to=text.word)


def resolve_config(sizes: dict[str, C], size: str, vocab_size: int, overrides: dict[str, Any]) -> C:
    """The named size's config with `vocab_size` and overrides applied (lists become tuples
    where the field is a tuple, since CLI overrides arrive as JSON)."""
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(sizes)}")
    base = sizes[size]
    names = {f.name for f in dataclasses.fields(base)}
    unknown = set(overrides) - names - DATA_SIZED
    if unknown:
        raise ValueError(
            f"unknown config field(s) {sorted(unknown)} for this recipe; known: {sorted(names)}"
        )
    kw = {k: v for k, v in overrides.items() if k in names}
    for k, v in kw.items():
        if isinstance(getattr(base, k), tuple) and isinstance(v, list):
            kw[k] = tuple(v)
    return dataclasses.replace(base, vocab_size=vocab_size, **kw)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialization: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding | nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Recipe(nn.Module):
    """Base of every recipe. Subclasses set the class attributes, build their modules in
    `__init__(cfg)` and implement `compute_losses`."""

    name: ClassVar[str] = "recipe"
    inputs: ClassVar[frozenset[str]] = frozenset()
    supported_tasks: ClassVar[frozenset[str]] = frozenset()
    sizes: ClassVar[dict[str, RecipeConfig]] = {}
    geometry: int = 0
    region_mask_overlap: bool = False
    conditional_masking: bool = False
    # Extra sample fields to decode (e.g. "tags.json") and a module-level function
    # `(batch, BatchContext) -> None` adding this recipe's own batch keys in the loader workers
    # (see train/collate.py); staticmethod so the class attribute stays a plain function.
    extra_fields: ClassVar[tuple[str, ...]] = ()
    batch_hook: ClassVar[Any] = None

    def __init__(self, cfg: RecipeConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.task_mode not in ("sum", "sample"):
            raise ValueError(f"task_mode must be 'sum' or 'sample', not {cfg.task_mode!r}")
        bad = set(cfg.tasks) - self.supported_tasks
        if bad or not cfg.tasks:
            raise ValueError(
                f"{self.name} cannot train {sorted(bad) or 'no tasks'}; "
                f"it knows {sorted(self.supported_tasks)}"
            )
        self.tasks: dict[str, float] = dict(cfg.tasks)
        self.task_mode: str = cfg.task_mode
        # Weight of a loss entry in the total beyond its task's weight (e.g. UNITER's WRA, which
        # rides on ITM batches with λ = 0.1).
        self.loss_weights: dict[str, float] = {}

    @classmethod
    def build(cls, size: str = "small", vocab_size: int = 30522, **overrides: Any) -> Self:
        cfg = resolve_config(cls.sizes, size, vocab_size, overrides)
        model = cls(cfg)
        model.reset_parameters()
        return model

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std)

    # -- tasks -------------------------------------------------------------------------------

    def active_tasks(self, batch: dict[str, Any]) -> list[str]:
        """The tasks this batch trains: its `task` in sample mode, else all of them. A sample-mode
        batch without `task` (a hand-made one) trains every task, like sum mode."""
        if self.task_mode == "sample" and batch.get("task") is not None:
            task = batch["task"]
            if task not in self.supported_tasks:
                raise ValueError(f"{self.name} cannot train task {task!r}")
            return [task]
        return list(self.tasks)

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"loss": weighted total, task name: that task's (unweighted) loss, …}."""
        losses = self.compute_losses(batch, self.active_tasks(batch))
        sample = self.task_mode == "sample" and batch.get("task") is not None
        total = None
        for k, v in losses.items():
            # In sample mode the task weights were the sampling odds; they do not scale the loss.
            w = self.loss_weights.get(k, 1.0) * (1.0 if sample else self.tasks.get(k, 1.0))
            total = v * w if total is None else total + v * w
        assert total is not None
        return {"loss": total, **losses}


def require(batch: dict[str, Any], keys: Iterable[str], task: str) -> None:
    """A clear error naming the task when its batch lacks a key of the contract."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"task {task!r} needs batch keys {missing}")


def mlm_task_loss(
    head: nn.Module, text_hidden: torch.Tensor, batch: dict[str, Any]
) -> torch.Tensor:
    """The MLM loss every text recipe computes: the head on the positions `mlm_labels` marks."""
    require(batch, ["mlm_labels"], "mlm")
    h, labels = masked_select(text_hidden, batch["mlm_labels"])
    return mlm_loss(head(h), labels)


def itm_task_loss(head: nn.Module, pooled: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The ITM loss of the pooled [CLS] against `itm_labels` (1 matched, 0 not)."""
    require(batch, ["itm_labels"], "itm")
    return itm_loss(head(pooled), batch["itm_labels"])
