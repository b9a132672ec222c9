"""DALL-E stage 1 (Ramesh et al. 2021, §2.1): a discrete VAE that compresses an image to a grid of
codes from a learned codebook, the image tokens of the `dalle` recipe.

A conv encoder gives logits over K codes per grid cell; training mixes the codebook by a
gumbel-softmax sample of them (temperature annealed exponentially from `temperature` towards
`temperature_min` over training forwards, as the paper anneals to 1/16; `straight_through` makes
the sample one-hot forward), a conv decoder reconstructs the pixels. Tasks: "recon" (MSE on the
loader's CLIP-normalised pixels; the paper's logit-Laplace is not used) and "kl" (KL from the
code distribution to the uniform prior; its weight is the paper's β, held constant here rather
than ramped). At inference an image's tokens are the argmax codes (`encode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlforge.train.losses.dvae import gumbel_codes, kl_to_uniform, reconstruction_loss
from vlforge.train.recipes.base import Recipe, RecipeConfig, require
from vlforge.train.recipes.registry import register_recipe


@dataclass
class DVAEConfig(RecipeConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"recon": 1.0, "kl": 1e-3})
    task_mode: str = "sum"
    image_size: int = 256
    grid: int = 32  # codes per side: image_size / grid must be a power of two
    codes: int = 8192
    code_dim: int = 512
    hidden: int = 256
    res_blocks: int = 2  # per side, at the grid's resolution
    temperature: float = 1.0
    temperature_min: float = 1.0 / 16
    anneal_rate: float = 1e-5  # per training forward: tau = max(min, tau0 · exp(−rate · n))
    straight_through: bool = False


class ResBlock(nn.Module):
    """x + conv1×1(relu(conv3×3(relu(x)))): the dVAE's residual unit at one resolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DiscreteVAE(nn.Module):
    """Pixels (B×3×S×S) ↔ codes (B×G×G in 0..K-1) through a codebook of K `code_dim` vectors."""

    def __init__(
        self, image_size: int, grid: int, codes: int, code_dim: int, hidden: int, res_blocks: int
    ):
        super().__init__()
        factor = image_size // grid if grid > 0 else 0
        if factor < 1 or image_size % grid or factor & (factor - 1):
            raise ValueError(
                f"dVAE image_size/grid must be a power of two, not {image_size}/{grid}"
            )
        downs = int(math.log2(factor))
        self.image_size, self.grid, self.codes = image_size, grid, codes
        enc: list[nn.Module] = [nn.Conv2d(3, hidden, 3, padding=1)]
        for _ in range(downs):
            enc += [nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        enc += [ResBlock(hidden) for _ in range(res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(hidden, codes, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(codes, code_dim)
        dec: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 1)]
        dec += [ResBlock(hidden) for _ in range(res_blocks)]
        for _ in range(downs):
            dec += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(hidden, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×K×G×G code logits."""
        return self.encoder(pixels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×G×G long: each cell's most likely code (the image's tokens)."""
        return self.logits(pixels).argmax(1)

    def decode_soft(self, weights: torch.Tensor) -> torch.Tensor:
        """B×K×G×G code weights (one-hot or relaxed) → B×3×S×S pixels."""
        z = torch.einsum("bkhw,kd->bdhw", weights, self.codebook.weight)
        return self.decoder(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """B×G×G (or B×G·G) long codes → B×3×S×S pixels."""
        codes = codes.view(codes.shape[0], self.grid, self.grid)
        return self.decoder(self.codebook(codes).permute(0, 3, 1, 2))


@register_recipe("dvae")
class DVAE(Recipe):
    name = "dvae"
    inputs = frozenset({"pixels"})
    supported_tasks = frozenset({"recon", "kl"})
    sizes: ClassVar[dict[str, DVAEConfig]] = {  # type: ignore[assignment]
        "small": DVAEConfig(
            image_size=32,
            grid=8,
            codes=64,
            code_dim=32,
            hidden=32,
            res_blocks=1,
            anneal_rate=1e-3,
        ),
        "base": DVAEConfig(),
    }

    def __init__(self, cfg: DVAEConfig):
        super().__init__(cfg)
        self.cfg: DVAEConfig = cfg
        self.image_size = cfg.image_size
        self.vae = DiscreteVAE(
            cfg.image_size, cfg.grid, cfg.codes, cfg.code_dim, cfg.hidden, cfg.res_blocks
        )
        # Training forwards so far: drives the temperature schedule and is checkpointed with the
        # weights, so a resumed run continues the same schedule.
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        # A conv net: PyTorch's default (Kaiming-uniform) init, not BERT's normal(0, std) that
        # `init_std` sets for transformers; only the codebook starts as a unit normal.
        nn.init.normal_(self.vae.codebook.weight)

    def temperature(self) -> float:
        cfg = self.cfg
        tau = cfg.temperature * math.exp(-cfg.anneal_rate * int(self.forwards))
        return max(cfg.temperature_min, tau)

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        require(batch, ["pixel_values"], "dvae")
        pixels = batch["pixel_values"]
        logits = self.vae.logits(pixels)
        if self.training:
            weights = gumbel_codes(logits, self.temperature(), self.cfg.straight_through)
            self.forwards += 1
        else:  # evaluation: the hard codes the transformer will see
            weights = nn.functional.one_hot(logits.argmax(1), self.cfg.codes)
            weights = weights.permute(0, 3, 1, 2).to(logits.dtype)
        out: dict[str, torch.Tensor] = {}
        if "recon" in tasks:
            out["recon"] = reconstruction_loss(self.vae.decode_soft(weights), pixels)
        if "kl" in tasks:
            out["kl"] = kl_to_uniform(logits)
        return out

    @torch.no_grad()
    def extra_metrics(self, evaluator: Any, samples: list[dict[str, Any]]) -> dict[str, float]:
        """Held-out reconstruction MSE through the argmax codes, and codebook use."""
        return reconstruction_metrics(self.vae, evaluator, samples)


def reconstruction_metrics(
    vae: DiscreteVAE, evaluator: Any, samples: list[dict[str, Any]]
) -> dict[str, float]:
    """dvae_recon_mse (normalised pixels, hard codes), dvae_codes_used, dvae_n."""
    err, n, used = 0.0, 0, set()
    for i in range(0, len(samples), evaluator.bs):
        batch = evaluator._batch(samples[i : i + evaluator.bs], i=i)
        pixels = batch["pixel_values"]
        codes = vae.encode(pixels)
        recon = vae.decode(codes)
        err += float(((recon.float() - pixels.float()) ** 2).mean((1, 2, 3)).sum())
        n += len(pixels)
        used.update(codes.unique().tolist())
    return {"dvae_recon_mse": err / max(1, n), "dvae_codes_used": len(used), "dvae_n": n}
