"""Mixture-of-experts layers that replace a model's `MLP` feed-forward blocks from outside.

Three routers from the papers:
- `topk`   — Shazeer et al. 2017: noisy top-k gating H = xW_g + N(0,1)·softplus(xW_noise),
             softmax over the kept k, with the importance loss w·CV(Σ_x G(x))² and the load loss
             w·CV(Σ_x P(x, i))², P the smooth probability that expert i stays in the top k.
- `gshard` — Lepikhin et al. 2020: top-2 of a softmax, second expert kept with probability
             2·g2 (g1 + g2 normalised to 1), expert capacity, ℓ_aux = (1/E)·Σ_e (c_e/S)·m_e.
- `switch` — Fedus et al. 2021: top-1, capacity factor, load balancing α·E·Σ_i f_i·P_i; the
             router z-loss of ST-MoE (Zoph et al. 2022), mean_x logsumexp(x)², is a later
             addition, off unless asked (`ParallelConfig.z_loss`; ST-MoE used 0.001).
Every router computes its logits and softmax in float32 with autocast off (Switch's "selective
precision": bf16 logits move the gates by ~1e-3 and flip near-tied choices).
Tokens past an expert's capacity get no expert output, so the layer's residual carries them.
Experts are initialised independently, as in the papers (not copies of the dense MLP, which
would be sparse upcycling, Komatsuzaki et al. 2022): each weight matrix drawn normal at the
dense layer's own scale, so identical experts do not start with identical gradients.

After each forward a layer holds `aux_loss` (to add to the task loss; `take_moe_outputs`) and
`stats` (per-expert load, dropped share) for metrics.jsonl.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.mlp import MLP
from vlforge.train.parallel.config import ParallelConfig

# Loss weights (hyperparameters, not part of the papers' formulas): Switch's α = 0.01 for every
# balancing loss, ST-MoE's 0.001 for the z-loss when it is asked for.
BALANCE_WEIGHT = 0.01
Z_LOSS_WEIGHT = 0.001
# Added to the noise scale as in Shazeer's reference code, so Φ(·/σ) never divides by zero.
NOISE_EPS = 1e-2


@dataclass
class Routing:
    """Where each token goes: `experts`/`gates` T×k (choice-major priority), `kept` T×k (False:
    not dispatched or over capacity), the aux losses, and stats."""

    experts: torch.Tensor
    gates: torch.Tensor
    kept: torch.Tensor
    aux: dict[str, torch.Tensor]
    load: torch.Tensor  # E: share of the dispatched assignments each expert was chosen for
    dropped: torch.Tensor  # share of the dispatched assignments over capacity


def expert_capacity(tokens: int, k: int, experts: int, factor: float | None) -> int:
    """Slots per expert: ⌈factor·k·T/E⌉ (GShard's 2N/E at factor 1, k 2); unlimited: T."""
    if factor is None:
        return tokens
    return max(1, math.ceil(factor * k * tokens / experts))


def apply_capacity(
    experts: torch.Tensor, wanted: torch.Tensor, n: int, capacity: int
) -> torch.Tensor:
    """Which of the wanted assignments fit: each expert's slots go to the first choices of all
    tokens in token order, then the second choices (GShard's priority). Returns T×k bool."""
    order = experts.t().reshape(-1)  # choice-major
    want = wanted.t().reshape(-1)
    onehot = F.one_hot(order, n) * want[:, None]
    position = (onehot.cumsum(0) - 1).gather(1, order[:, None]).squeeze(1)
    fits = want & (position < capacity)
    return fits.view(experts.shape[1], experts.shape[0]).t()


def _stats(experts: torch.Tensor, wanted: torch.Tensor, kept: torch.Tensor, n: int):
    counts = torch.bincount(experts[wanted], minlength=n).float()
    total = wanted.sum().clamp(min=1)
    return counts / total, 1.0 - kept.sum() / total


def router_logits(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ in float32 whatever the autocast dtype (the router's selective precision)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), gate.weight.float())


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance (Shazeer's balancing statistic)."""
    return x.float().var(correction=0) / (x.float().mean() ** 2 + 1e-10)


class NoisyTopKRouter(nn.Module):
    """Shazeer et al. 2017. W_g and W_noise start at zero, as in the paper."""

    def __init__(self, dim: int, experts: int, k: int, capacity: float | None):
        super().__init__()
        self.n, self.k, self.capacity = experts, k, capacity
        self.gate = nn.Linear(dim, experts, bias=False)
        self.noise = nn.Linear(dim, experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        clean = router_logits(self.gate, x)
        noisy = clean
        if self.training:
            std = F.softplus(router_logits(self.noise, x)) + NOISE_EPS
            noisy = clean + torch.randn_like(clean) * std
        top, idx = noisy.topk(min(self.k + 1, self.n), dim=-1)
        gates = torch.softmax(top[:, : self.k], -1)
        experts = idx[:, : self.k]
        full = torch.zeros_like(clean).scatter(1, experts, gates)
        importance = full.sum(0)
        if self.training and self.k < self.n:
            # P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / σ_i): the k-th largest of the
            # others is the (k+1)-th overall for an expert in the top k, else the k-th.
            inside = noisy >= top[:, self.k - 1 : self.k]
            threshold = torch.where(
                inside, top[:, self.k : self.k + 1], top[:, self.k - 1 : self.k]
            )
            prob = torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / std)
            load = prob.sum(0)
        else:
            load = (full > 0).float().sum(0)
        aux = {"importance": BALANCE_WEIGHT * cv_squared(importance)}
        aux["load"] = BALANCE_WEIGHT * cv_squared(load)
        wanted = torch.ones_like(experts, dtype=torch.bool)
        cap = expert_capacity(x.shape[0], self.k, self.n, self.capacity)
        kept = apply_capacity(experts, wanted, self.n, cap)
        load_share, dropped = _stats(experts, wanted, kept, self.n)
        return Routing(experts, gates, kept, aux, load_share, dropped)


class GShardRouter(nn.Module):
    """Lepikhin et al. 2020: top-2, random routing of the second expert, capacity."""

    def __init__(self, dim: int, experts: int, capacity: float | None):
        super().__init__()
        self.n, self.capacity = experts, capacity
        self.gate = nn.Linear(dim, experts, bias=False)
        nn.init.normal_(self.gate.weight, std=math.sqrt(0.1 / dim))

    def forward(self, x: torch.Tensor) -> Routing:
        probs = torch.softmax(router_logits(self.gate, x), -1)
        g, experts = probs.topk(2, dim=-1)
        gates = g / g.sum(-1, keepdim=True)
        wanted = torch.ones_like(experts, dtype=torch.bool)
        if self.training:
            # One uniform draw per token: keep the second expert with probability 2·g2.
            wanted[:, 1] = torch.rand(x.shape[0], device=x.device) < 2 * gates[:, 1].detach()
        # c_e/S: share of tokens whose first choice is e; m_e: mean gate of e. Scaled by E² (as
        # fairseq and tutel do) so that balanced routing gives 1, like Switch's loss.
        first = F.one_hot(experts[:, 0], self.n).float().mean(0)
        aux = {"balance": BALANCE_WEIGHT * self.n**2 * (first * probs.mean(0)).mean()}
        cap = expert_capacity(x.shape[0], 2, self.n, self.capacity)
        kept = apply_capacity(experts, wanted, self.n, cap)
        load, dropped = _stats(experts, wanted, kept, self.n)
        return Routing(experts, gates, kept, aux, load, dropped)


class SwitchRouter(nn.Module):
    """Fedus et al. 2021: top-1; `z_loss` > 0 adds ST-MoE's router z-loss with that weight."""

    def __init__(self, dim: int, experts: int, capacity: float | None, z_loss: float = 0.0):
        super().__init__()
        self.n, self.capacity, self.z_loss = experts, capacity, z_loss
        self.gate = nn.Linear(dim, experts, bias=False)
        nn.init.normal_(self.gate.weight, std=math.sqrt(0.1 / dim))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = router_logits(self.gate, x)
        probs = torch.softmax(logits, -1)
        gate, expert = probs.max(-1)
        f = F.one_hot(expert, self.n).float().mean(0)
        aux = {"balance": BALANCE_WEIGHT * self.n * (f * probs.mean(0)).sum()}
        if self.z_loss > 0:
            aux["z"] = self.z_loss * torch.logsumexp(logits, -1).pow(2).mean()
        experts, gates = expert[:, None], gate[:, None]
        wanted = torch.ones_like(experts, dtype=torch.bool)
        cap = expert_capacity(x.shape[0], 1, self.n, self.capacity)
        kept = apply_capacity(experts, wanted, self.n, cap)
        load, dropped = _stats(experts, wanted, kept, self.n)
        return Routing(experts, gates, kept, aux, load, dropped)


def build_router(
    kind: str, dim: int, experts: int, k: int, capacity: float | None, z_loss: float = 0.0
) -> nn.Module:
    if kind == "topk":
        return NoisyTopKRouter(dim, experts, k, capacity)
    if kind == "gshard":
        return GShardRouter(dim, experts, capacity)
    if kind == "switch":
        return SwitchRouter(dim, experts, capacity, z_loss)
    raise ValueError(f"unknown router {kind!r}")


def sorted_assignments(
    routing: Routing,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept (token, expert, gate) triples, grouped by expert (stable in token order)."""
    tokens = torch.arange(routing.experts.shape[0], device=routing.experts.device)
    tokens = tokens[:, None].expand_as(routing.experts)[routing.kept]
    experts, gates = routing.experts[routing.kept], routing.gates[routing.kept]
    order = torch.sort(experts, stable=True).indices
    return tokens[order], experts[order], gates[order]


def independent_copy(template: MLP) -> MLP:
    """The template's structure with fresh weight matrices: normal(0, σ) with σ the template's
    own weight std (the recipe's init scale; drawn from torch's global RNG, which every rank
    holds in the same state when the model is built), biases and norms copied as they are."""
    expert = copy.deepcopy(template)
    with torch.no_grad():
        for p, t in zip(expert.parameters(), template.parameters(), strict=True):
            if p.dim() >= 2:
                p.normal_(0.0, float(t.float().std()) if t.numel() > 1 else 0.02)
    return expert


class MoE(nn.Module):
    """A router and E experts (MLPs) in place of one MLP. Experts sit in a ModuleDict keyed by
    their global index, so expert parallelism keeps checkpoint names when it drops the others."""

    def __init__(self, template: MLP, router: nn.Module, experts: int):
        super().__init__()
        self.router = router
        self.num_experts = experts
        self.experts = nn.ModuleDict({str(e): independent_copy(template) for e in range(experts)})
        self.expert_parallel: Callable[..., torch.Tensor] | None = None  # apply_ep sets it
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        self.aux_loss = sum(routing.aux.values())  # type: ignore[assignment]
        self.stats = {"dropped": routing.dropped.detach()}
        self.stats |= {f"load_e{e}": v for e, v in enumerate(routing.load.detach())}
        tokens, experts, gates = sorted_assignments(routing)
        if self.expert_parallel is not None:
            y = self.expert_parallel(flat, tokens, experts, self.experts)
        else:
            counts = torch.bincount(experts, minlength=self.num_experts).tolist()
            parts = [
                self.experts[str(e)](rows) for e, rows in enumerate(flat[tokens].split(counts))
            ]
            y = torch.cat(parts)
        out = torch.zeros_like(flat).index_add(0, tokens, (y * gates[:, None]).to(flat.dtype))
        return out.view_as(x)


def apply_moe(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Replaces every `moe_every`-th MLP (in module order) by an MoE layer, in place."""
    if cfg.moe is None:
        return model
    # MLPs already inside an MoE layer are its experts: applying twice changes nothing.
    inside = {id(x) for m in model.modules() if isinstance(m, MoE) for x in m.modules()}
    targets = [
        (name, m) for name, m in model.named_modules() if isinstance(m, MLP) and id(m) not in inside
    ]
    for i, (name, mlp) in enumerate(targets):
        if i % cfg.moe_every != cfg.moe_every - 1:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dim = mlp.fc1.in_features
        router = build_router(cfg.moe, dim, cfg.experts, cfg.k, cfg.capacity, cfg.z_loss)
        layer = MoE(mlp, router, cfg.experts).to(mlp.fc1.weight.device)
        setattr(parent, attr, layer)
    return model


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    return (m for m in model.modules() if isinstance(m, MoE))


def take_moe_outputs(model: nn.Module, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`out` with the MoE layers' aux losses of the last forward added to "loss" (and logged as
    "moe_aux"), and their routing stats averaged over layers ("moe_load_e{i}", "moe_dropped").
    Clears the layers' references, so no graph outlives the step."""
    layers = [m for m in moe_layers(model) if m.aux_loss is not None]
    if not layers:
        return out
    aux = sum(m.aux_loss for m in layers)  # type: ignore[misc]
    stats: dict[str, torch.Tensor] = {}
    for m in layers:
        for k, v in m.stats.items():
            stats[f"moe_{k}"] = stats.get(f"moe_{k}", 0) + v / len(layers)
        m.aux_loss, m.stats = None, {}
    return {**out, "loss": out["loss"] + aux, "moe_aux": aux.detach(), **stats}
