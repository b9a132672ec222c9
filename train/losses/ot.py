"""Word-region alignment by optimal transport, solved with IPOT (UNITER, after Xie et al. 2018).

The transport plan T between a caption's tokens and an image's regions minimises ⟨C, T⟩ with
uniform marginals over the real tokens/regions, C the cosine distance of their contextual
states. IPOT is a proximal-point iteration: each step solves an entropic problem whose prior is
the previous plan, so it approaches the exact (unregularized) plan rather than a blurred one.
T is found without gradients; the distance ⟨C, T⟩ back-propagates through C only (as UNITER).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """B×M×D, B×N×D → B×M×N cosine distances 1 − cos."""
    x = F.normalize(x, dim=-1, eps=eps)
    y = F.normalize(y, dim=-1, eps=eps)
    return 1.0 - x @ y.transpose(1, 2)


@torch.no_grad()
def ipot(
    cost: torch.Tensor,
    x_mask: torch.Tensor,
    y_mask: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> torch.Tensor:
    """Transport plans B×M×N for costs B×M×N between the real (mask 1) rows and columns.

    Marginals are uniform: each real row carries 1/m, each real column 1/n. `beta` is the
    proximal step (smaller = closer to exact per step, slower mixing); `inner` Sinkhorn steps per
    proximal step (1 in UNITER).
    """
    c = cost.float()
    xm, ym = x_mask.to(c.dtype), y_mask.to(c.dtype)
    joint = xm[:, :, None] * ym[:, None, :]
    mu = xm / xm.sum(1, keepdim=True).clamp(min=1.0)  # B×M
    nu = ym / ym.sum(1, keepdim=True).clamp(min=1.0)  # B×N
    a = torch.exp(-c / beta) * joint
    t = joint.clone()
    sigma = nu.clone()
    delta = mu.clone()
    tiny = torch.finfo(c.dtype).tiny
    for _ in range(iterations):
        q = a * t
        for _ in range(inner):
            # Padded rows/columns have zero mass: their scalings are forced to 0, not 0/0.
            delta = mu / (q @ sigma[..., None]).squeeze(-1).clamp(min=tiny)
            sigma = nu / (q.transpose(1, 2) @ delta[..., None]).squeeze(-1).clamp(min=tiny)
        t = delta[..., None] * q * sigma[:, None, :]
    return t * joint


def optimal_transport_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    x_mask: torch.Tensor,
    y_mask: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """B distances ⟨C, T⟩ between token states x (B×M×D) and region states y (B×N×D)."""
    cost = cosine_cost(x.float(), y.float())
    joint = x_mask.bool()[:, :, None] & y_mask.bool()[:, None, :]
    cost = cost.masked_fill(~joint, 0.0)
    plan = ipot(cost.detach(), x_mask, y_mask, beta=beta, iterations=iterations)
    return (cost * plan).sum((1, 2))


def wra_loss(distance: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """UNITER's WRA: pull matched pairs' transport distance down and push mismatched ones up,
    (Σ d_pos − Σ d_neg) / B."""
    sign = torch.where(labels.bool(), 1.0, -1.0).to(distance.dtype)
    return (sign * distance).sum() / distance.shape[0]
