"""Adversarial training of single-stream recipes: VILLA (Gan et al. 2020) on FreeLB (Zhu et al. 2020).

A recipe turns it on with its config's `adversarial` flag (`--set adversarial=true`), in
pretraining and fine-tuning alike; `--recipe villa` is UNITER with it on. Every training batch
then trains

    L_task(x) + Σ_m 1/K Σ_k [ L_task(x + δ_m,k) + α · KL_sym(f(x) ‖ f(x + δ_m,k)) ]

where, as in VILLA's reference code, each modality m is perturbed on its own (the other left
clean) and in its raw input space: the word embeddings (before positions, segments and the
LayerNorm) and the region features (before their projection). δ_m,k lies, per example, within
an L2 ball of radius `adv_max_norm` (0 = unbounded, as VILLA's default); δ_m,0 is FreeLB's
uniform start of norm `adv_init_mag`, and δ_m,k+1 = Π(δ_m,k + adv_lr · g / ‖g‖) with g the
gradient of step k's adversarial objective. The reference backpropagates each modality's
objective separately, so the modalities' terms add up (and are not averaged). The KL is
symmetric (VILLA's R_kl) over the recipe's classification outputs (MLM, ITM, region classes),
the clean side detached: the clean branch is trained by its own task loss, the adversarial
branch is pulled towards it.

FreeLB accumulates the parameter gradients of the K steps with one backward per step. Here each
ascent direction is taken with `torch.autograd.grad(…, δ)` (which leaves parameter gradients
alone) and the objectives are returned summed, so the trainer's single `.backward()` gives the
same accumulated gradients — and DDP, FSDP, gradient accumulation and autocast see one ordinary
forward/backward, with no change to the trainer. The price is memory: the 2K + 1 forward graphs
live until that backward (FreeLB frees each after its step).

The seam a recipe provides (see uniter.py):
- `raw_inputs(batch) -> (inputs, key masks)`: dicts keyed by modality ("text", "image"),
  B×N×D and B×N;
- `task_outputs(batch, tasks, raw) -> (losses, logits)`: the task losses and the
  classification logits (N×C each) computed from given (perturbed) raw inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

Embedded = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class AdversarialConfig:
    """Config fields a recipe's config inherits to offer adversarial training. Defaults follow
    VILLA (3 steps, KL weight 1.5) with FreeLB's random start; the step and the bound are per
    example (all its tokens or regions), sized for the small configs' raw inputs (word vectors
    of std `init_std`, region features of unit scale), and one for both modalities."""

    adversarial: bool = False
    adv_steps: int = 3
    adv_lr: float = 0.1
    adv_max_norm: float = 1.0
    adv_init_mag: float = 0.1
    adv_kl_weight: float = 1.5


class Perturbable(Protocol):
    tasks: dict[str, float]
    task_mode: str
    loss_weights: dict[str, float]

    def raw_inputs(self, batch: dict[str, Any]) -> Embedded: ...

    def task_outputs(
        self, batch: dict[str, Any], tasks: list[str], raw: Embedded | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]: ...


def adversarial_loss_weights(cfg: AdversarialConfig) -> dict[str, float]:
    """The recipe's `loss_weights` entries of the two adversarial terms."""
    return {"adv": 1.0, "adv_kl": cfg.adv_kl_weight} if cfg.adversarial else {}


def check_config(cfg: AdversarialConfig) -> None:
    if cfg.adversarial and cfg.adv_steps < 1:
        raise ValueError("adv_steps must be at least 1")
    if min(cfg.adv_lr, cfg.adv_max_norm, cfg.adv_init_mag, cfg.adv_kl_weight) < 0:
        raise ValueError("adv_lr, adv_max_norm, adv_init_mag and adv_kl_weight must be ≥ 0")


def _per_example_norm(delta: torch.Tensor) -> torch.Tensor:
    """B×1×1 Frobenius norms over each example's tokens and channels."""
    return delta.flatten(1).norm(dim=1).view(-1, 1, 1)


def project(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """δ scaled back onto the L2 ball of radius `max_norm` per example (0: no bound)."""
    if max_norm <= 0:
        return delta
    scale = (max_norm / _per_example_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    return delta * scale


def init_delta(embedding: torch.Tensor, mask: torch.Tensor, init_mag: float) -> torch.Tensor:
    """FreeLB's start: uniform in [-1, 1] on the real positions, scaled to norm ≈ init_mag·(1/√3)
    per example (`init_mag / √(positions · hidden)` per entry). Draws from torch's global RNG."""
    m = mask.to(embedding.dtype).unsqueeze(-1)
    delta = torch.empty_like(embedding).uniform_(-1, 1) * m
    dims = (m.flatten(1).sum(1) * embedding.shape[-1]).clamp(min=1).view(-1, 1, 1)
    return (delta * init_mag / dims.sqrt()).detach()


def ascend(
    delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, lr: float, max_norm: float
) -> torch.Tensor:
    """One FreeLB ascent step: along the per-example normalized gradient, then projected."""
    grad = grad * mask.to(grad.dtype).unsqueeze(-1)
    step = grad / _per_example_norm(grad).clamp(min=1e-12)
    return project(delta + lr * step, max_norm).detach()


def symmetric_kl(clean: dict[str, torch.Tensor], adv: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over heads of the mean over rows of KL(p‖q) + KL(q‖p); clean logits taken as given
    (detach them to keep the gradient on the adversarial side)."""
    total = None
    for name, q_logits in adv.items():
        if name not in clean or q_logits.shape[0] == 0:
            continue
        logp = F.log_softmax(clean[name].float(), -1)
        logq = F.log_softmax(q_logits.float(), -1)
        kl = ((logp.exp() * (logp - logq)) + (logq.exp() * (logq - logp))).sum(-1).mean()
        total = kl if total is None else total + kl
    if total is None:  # no classification output in this batch (e.g. a feature-regression task)
        return next(iter(adv.values())).sum() * 0.0 if adv else torch.zeros(())
    return total


def weighted_total(
    recipe: Perturbable, losses: dict[str, torch.Tensor], sampled: bool
) -> torch.Tensor:
    """The task losses summed as `Recipe.forward` sums them (task weights in sum mode; in sample
    mode the weights were the sampling odds and only `loss_weights` scale)."""
    total = None
    for k, v in losses.items():
        w = recipe.loss_weights.get(k, 1.0) * (1.0 if sampled else recipe.tasks.get(k, 1.0))
        total = v * w if total is None else total + v * w
    if total is None:
        raise ValueError("the batch trained no task")
    return total


def adversarial_losses(
    recipe: Perturbable, batch: dict[str, Any], tasks: list[str], cfg: AdversarialConfig
) -> dict[str, torch.Tensor]:
    """The clean task losses plus "adv" (the adversarial task loss, summed over the modalities,
    mean over the K steps) and "adv_kl" (the symmetric KL, likewise); see the module docstring. Under `torch.no_grad()` (a loss
    probe in training mode) the ascent still needs gradients: they are enabled inside, and the
    values come back detached."""
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            out = adversarial_losses(recipe, batch, tasks, cfg)
        return {k: v.detach() for k, v in out.items()}
    raw, masks = recipe.raw_inputs(batch)
    losses, clean_logits = recipe.task_outputs(batch, tasks, (raw, masks))
    clean_logits = {k: v.detach() for k, v in clean_logits.items()}
    sampled = recipe.task_mode == "sample" and batch.get("task") is not None
    adv_sum, kl_sum = None, None
    for modality, clean in raw.items():
        delta = init_delta(clean, masks[modality], cfg.adv_init_mag)
        for step in range(cfg.adv_steps):
            delta.requires_grad_(True)
            # The clean inputs stay in the graph: the adversarial losses train them too.
            perturbed = {**raw, modality: clean + delta}
            adv, logits = recipe.task_outputs(batch, tasks, (perturbed, masks))
            adv_loss = weighted_total(recipe, adv, sampled)
            kl = symmetric_kl(clean_logits, logits)
            adv_sum = adv_loss if adv_sum is None else adv_sum + adv_loss
            kl_sum = kl if kl_sum is None else kl_sum + kl
            if step == cfg.adv_steps - 1:
                break  # the last δ is not used again
            objective = adv_loss + cfg.adv_kl_weight * kl
            (grad,) = torch.autograd.grad(objective, [delta], retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(delta) if grad is None else grad
            delta = ascend(delta.detach(), grad, masks[modality], cfg.adv_lr, cfg.adv_max_norm)
    assert adv_sum is not None and kl_sum is not None
    return {**losses, "adv": adv_sum / cfg.adv_steps, "adv_kl": kl_sum / cfg.adv_steps}
