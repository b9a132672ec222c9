"""The discrete VAE's relaxation and objective (DALL-E, Ramesh et al. 2021, §2.1): gumbel-softmax
codes over the codebook, KL from the code distribution to the uniform prior, and a pixel
reconstruction term (MSE on the normalised pixels; the paper's logit-Laplace is not used)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gumbel_codes(
    logits: torch.Tensor, temperature: float, hard: bool = False, dim: int = 1
) -> torch.Tensor:
    """Relaxed one-hot codes from `logits` over `dim` (PyTorch's gumbel-softmax). `hard`: one-hot
    forward, the soft sample's gradient backward (straight-through)."""
    if temperature <= 0:
        raise ValueError(f"gumbel-softmax temperature must be positive, not {temperature}")
    return F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=dim)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q ‖ uniform) = Σ q log q + log K per grid cell, averaged over cells (nats)."""
    logq = F.log_softmax(logits.float(), dim=dim)
    per_cell = (logq.exp() * logq).sum(dim) + math.log(logits.shape[dim])
    return per_cell.mean()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel channel."""
    return F.mse_loss(recon.float(), target.float())
