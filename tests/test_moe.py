"""MoE layers: routing and capacity against hand computations, aux losses against the papers'
formulas, expert parallelism on two gloo ranks against one rank, and an MoE run's metrics.jsonl.

The hand computations loop over tokens and experts as the papers state the rules, rather than
reusing the vectorised code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_zero_tp import (
    config,
    init_rank,
    make_batch,
    make_model,
    optimizer_for,
    split,
    step,
)
from torch import nn

from tests.conftest import run_cli
from vlforge.train import checkpoint as ckpt
from vlforge.train import trainer
from vlforge.train.blocks import MLP, TransformerLayer
from vlforge.train.distributed import free_port, parallelize
from vlforge.train.parallel import ParallelConfig
from vlforge.train.parallel.moe import (
    BALANCE_WEIGHT,
    NOISE_EPS,
    Z_LOSS_WEIGHT,
    GShardRouter,
    MoE,
    NoisyTopKRouter,
    SwitchRouter,
    apply_moe,
    moe_layers,
)


def router_with(router: nn.Module, weight: list[list[float]]) -> nn.Module:
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor(weight).t())
    return router


def test_switch_routes_top1_and_drops_past_capacity():
    # Token t's logits are its features (identity gate): experts 0,0,0,1,2,1 for the 6 tokens.
    x = torch.tensor([[3, 0, 0], [2, 1, 0], [4, 0, 1], [0, 2, 1], [0, 0, 5], [1, 3, 0]]).float()
    router = router_with(SwitchRouter(3, 3, capacity=1.0), torch.eye(3).tolist())
    r = router(x)
    assert r.experts.squeeze(1).tolist() == [0, 0, 0, 1, 2, 1]
    # Capacity ⌈1.0·6/3⌉ = 2: expert 0's third token (token 2) is dropped, in token order.
    assert r.kept.squeeze(1).tolist() == [True, True, False, True, True, True]
    torch.testing.assert_close(r.gates.squeeze(1), torch.softmax(x, -1).max(-1).values)
    torch.testing.assert_close(r.load, torch.tensor([3, 2, 1]) / 6.0)
    assert float(r.dropped) == pytest.approx(1 / 6)

    # The layer: kept tokens get gate × their expert's output; the dropped token gets nothing,
    # so in a transformer layer its residual alone carries it.
    torch.manual_seed(0)
    moe = MoE(MLP(3, 8), router, 3)
    for e in moe.experts.values():
        nn.init.normal_(e.fc1.weight)
    y = moe(x)
    for t, (e, g) in enumerate(zip(r.experts.squeeze(1), r.gates.squeeze(1), strict=True)):
        want = torch.zeros(3) if t == 2 else g * moe.experts[str(int(e))](x[t])
        torch.testing.assert_close(y[t], want)
    layer = TransformerLayer(3, 1, 8, norm_first=True)
    layer.mlp, layer.norm2 = moe, nn.Identity()  # the FFN sublayer sees x itself …
    nn.init.zeros_(layer.attn.o.weight)  # … because attention adds nothing
    nn.init.zeros_(layer.attn.o.bias)
    out = layer(x[None])[0]
    torch.testing.assert_close(out[2], x[2])
    torch.testing.assert_close(out[[0, 1, 3, 4, 5]], x[[0, 1, 3, 4, 5]] + y[[0, 1, 3, 4, 5]])


def test_switch_losses_are_the_papers():
    torch.manual_seed(1)
    x = torch.randn(10, 6)
    router = SwitchRouter(6, 4, capacity=None, z_loss=Z_LOSS_WEIGHT)
    r = router(x)
    logits = x @ router.gate.weight.t()
    probs = torch.softmax(logits, -1)
    f = [sum(int(probs[t].argmax()) == i for t in range(10)) / 10 for i in range(4)]
    p = [float(probs[:, i].mean()) for i in range(4)]
    balance = BALANCE_WEIGHT * 4 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    z = Z_LOSS_WEIGHT * sum(float(torch.logsumexp(logits[t], 0)) ** 2 for t in range(10)) / 10
    assert float(r.aux["balance"]) == pytest.approx(balance, rel=1e-5)
    assert float(r.aux["z"]) == pytest.approx(z, rel=1e-5)
    assert not r.kept.logical_not().any()  # no capacity: nothing dropped


def test_gshard_top2_random_second_expert_and_capacity():
    torch.manual_seed(2)
    T, E = 8, 3
    x = torch.randn(T, 5)
    router = GShardRouter(5, E, capacity=0.5)  # ⌈0.5·2·8/3⌉ = 3 slots per expert
    nn.init.normal_(router.gate.weight)  # confident gates: some second experts stay home
    router.train()
    torch.manual_seed(4)
    u = torch.rand(T)
    torch.manual_seed(4)
    r = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    want_kept, counts, wanted = [[False, False] for _ in range(T)], [0] * E, []
    for t in range(T):
        order = sorted(range(E), key=lambda e: -float(probs[t, e]))[:2]
        g1, g2 = float(probs[t, order[0]]), float(probs[t, order[1]])
        assert r.experts[t].tolist() == order
        assert r.gates[t].tolist() == pytest.approx([g1 / (g1 + g2), g2 / (g1 + g2)], rel=1e-6)
        # The second expert is dispatched with probability 2·g2 (normalised gates).
        wanted.append([True, bool(u[t] < 2 * g2 / (g1 + g2))])
    for choice in (0, 1):  # all first choices claim slots before any second choice
        for t in range(T):
            e = int(r.experts[t, choice])
            if wanted[t][choice] and counts[e] < 3:
                counts[e] += 1
                want_kept[t][choice] = True
    assert r.kept.tolist() == want_kept
    assert any(not w[1] for w in wanted) and any(w[1] for w in wanted)  # both outcomes seen
    assert r.kept.sum() < sum(map(sum, wanted))  # and something dropped at capacity
    dispatched = sum(map(sum, wanted))
    assert float(r.dropped) == pytest.approx(1 - sum(counts) / dispatched)
    # ℓ_aux = (1/E)·Σ_e (c_e/S)·m_e, scaled by E² so balanced routing gives 1.
    c = [sum(int(r.experts[t, 0]) == e for t in range(T)) for e in range(E)]
    m = [float(probs[:, e].mean()) for e in range(E)]
    paper = sum(c[e] / T * m[e] for e in range(E)) / E
    assert float(r.aux["balance"]) == pytest.approx(BALANCE_WEIGHT * E**2 * paper, rel=1e-5)


def test_noisy_topk_gating_and_losses_are_shazeers():
    torch.manual_seed(3)
    T, E, k, d = 6, 4, 2, 5
    x = torch.randn(T, d)
    router = NoisyTopKRouter(d, E, k, capacity=None)
    nn.init.normal_(router.gate.weight)
    nn.init.normal_(router.noise.weight)
    router.train()
    torch.manual_seed(11)
    noise = torch.randn(T, E)
    torch.manual_seed(11)
    r = router(x)
    clean = x @ router.gate.weight.t()
    std = torch.nn.functional.softplus(x @ router.noise.weight.t()) + NOISE_EPS
    h = clean + noise * std
    normal = torch.distributions.Normal(0.0, 1.0)
    importance, load = torch.zeros(E), torch.zeros(E)
    for t in range(T):
        top = sorted(range(E), key=lambda e: -float(h[t, e]))[:k]
        assert sorted(r.experts[t].tolist()) == sorted(top)
        g = torch.softmax(h[t, top], 0)
        for e, ge in zip(top, g, strict=True):
            importance[e] += ge
        for i in range(E):
            others = sorted((float(h[t, j]) for j in range(E) if j != i), reverse=True)
            kth_excluding = others[k - 1]
            load[i] += normal.cdf((clean[t, i] - kth_excluding) / std[t, i])

    def cv2(v):
        return float(v.var(correction=0) / v.mean() ** 2)

    assert float(r.aux["importance"]) == pytest.approx(BALANCE_WEIGHT * cv2(importance), rel=1e-4)
    assert float(r.aux["load"]) == pytest.approx(BALANCE_WEIGHT * cv2(load), rel=1e-4)
    assert bool(r.kept.all())  # Shazeer's gating has no capacity limit


def test_switch_with_room_is_dense_top1():
    torch.manual_seed(4)
    E, d = 4, 6
    moe = MoE(MLP(d, 12), SwitchRouter(d, E, capacity=float(E)), E)
    for e in moe.experts.values():
        nn.init.normal_(e.fc1.weight, std=0.5)
    x = torch.randn(2, 7, d)
    y = moe(x).reshape(-1, d)
    flat = x.reshape(-1, d)
    probs = torch.softmax(flat @ moe.router.gate.weight.t(), -1)
    for t in range(flat.shape[0]):
        e = int(probs[t].argmax())
        torch.testing.assert_close(y[t], probs[t, e] * moe.experts[str(e)](flat[t]))
    assert float(moe.stats["dropped"]) == 0.0


def test_apply_moe_replaces_every_nth_mlp_with_independent_experts():
    model = make_model("uniter")  # 2 layers
    dense = model.encoder.layers[1].mlp
    apply_moe(model, ParallelConfig(moe="gshard", experts=4, moe_every=2, capacity_factor=2.0))
    kinds = [type(layer.mlp).__name__ for layer in model.encoder.layers]
    assert kinds == ["MLP", "MoE"]
    # Experts are initialised on their own (not sparse upcycling): none equals the dense MLP.
    experts = model.encoder.layers[1].mlp.experts.values()
    assert not any(torch.equal(e.fc1.weight, dense.fc1.weight) for e in experts)
    vilbert = apply_moe(make_model("vilbert"), ParallelConfig(moe="switch", experts=2))
    assert sum(1 for _ in moe_layers(vilbert)) == 4 + 2 * 2  # each layer's MLP, both streams


# ---------------------------------------------------------------------------------------------
# Expert parallel on two ranks


def _layer(kind: str) -> MoE:
    torch.manual_seed(5)
    router = {"switch": SwitchRouter(6, 4, 1.0), "gshard": GShardRouter(6, 4, 1.0)}[kind]
    moe = MoE(MLP(6, 10), router, 4)
    for e in moe.experts.values():
        nn.init.normal_(e.fc1.weight, std=0.5)  # experts that differ
    return moe


def _ep_worker(rank: int, world: int, port: int, out: str) -> None:
    info = init_rank(rank, world, port)
    results: dict = {}
    # One layer: each rank's tokens through the experts of both ranks, against all on one rank.
    for kind in ("switch", "gshard"):
        xs = [torch.randn(12, 6, generator=torch.Generator().manual_seed(r)) for r in range(2)]
        ref = _layer(kind)
        ref_out, grads = [], []
        for r in range(world):
            torch.manual_seed(20 + r)  # gshard's random routing draws
            y = ref(xs[r])
            ref_out.append(y)
            ref.zero_grad()
            (y.square().sum() / world).backward()
            grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
        ep_model = parallelize(_layer(kind), info, ParallelConfig(moe=kind, experts=4, ep=2))
        torch.manual_seed(20 + rank)
        y = ep_model(xs[rank])
        (y.square().sum()).backward()
        local = {n: p.grad for n, p in ep_model.module.named_parameters()}
        results[f"{kind}/out"] = bool(torch.allclose(y, ref_out[rank], atol=1e-6))
        results[f"{kind}/experts"] = sorted(ep_model.module.experts.keys())
        # Expert gradients: every rank's tokens, averaged like DDP averages the dense ones.
        results[f"{kind}/grads"] = all(
            torch.allclose(g, (grads[0][n] + grads[1][n]), atol=1e-5) for n, g in local.items()
        )
    # The trainer path: uniter with Switch layers, experts over both ranks, ZeRO 0 and 3.
    for zero in (0, 3):
        cfg = config("uniter", moe="switch", experts=4, ep=2, zero=zero, capacity_factor=4.0)
        model = parallelize(make_model("uniter"), info, cfg)
        optimizer, scheduler = optimizer_for(model, cfg)
        curve = []
        for s in range(3):
            m = step(model, optimizer, scheduler, [split(make_batch("uniter", s), world)[rank]])
            loss = torch.tensor(m["loss"])
            torch.distributed.all_reduce(loss)
            curve.append({"loss": float(loss) / world, "grad_norm": m["grad_norm"]})
            if zero == 0 and s == 1:
                ckpt.save_checkpoint(f"{out}/ep", 2, model, optimizer, {}, keep=1)
                experts = {
                    n.removeprefix("module."): p.detach().clone()
                    for n, p in model.named_parameters()
                    if ".experts." in n
                }
                torch.save(experts, f"{out}/experts{rank}.pt")
        results[f"train/zero{zero}"] = curve
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    trainer.shutdown()


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ep")
    mp.start_processes(_ep_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="fork")
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("kind", ["switch", "gshard"])
def test_expert_parallel_layer_equals_one_rank(ep_results, kind):
    _, r = ep_results
    assert r[f"{kind}/experts"] == ["0", "1"]  # rank 0 holds experts 0-1 of 4
    assert r[f"{kind}/out"] and r[f"{kind}/grads"]


def test_expert_parallel_training_equals_one_process(ep_results):
    torch.set_num_threads(1)
    out, r = ep_results
    cfg = config("uniter", moe="switch", experts=4, capacity_factor=4.0)
    model = apply_moe(make_model("uniter"), ParallelConfig.of(cfg))
    optimizer, scheduler = optimizer_for(model, cfg)
    want = [step(model, optimizer, scheduler, split(make_batch("uniter", s), 2)) for s in range(3)]
    for zero in (0, 3):
        for a, b in zip(r[f"train/zero{zero}"], want, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), zero
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), zero
    # Saved by two ranks holding two experts each; loaded whole into one process.
    plain = apply_moe(make_model("uniter"), ParallelConfig.of(cfg))
    ckpt.load_model_weights(ckpt.checkpoint_dir(out / "ep") / "step_00000002", plain)
    params = dict(plain.named_parameters())
    saved = {**torch.load(out / "experts0.pt"), **torch.load(out / "experts1.pt")}
    assert len(saved) == sum(".experts." in n for n in params)
    for n, v in saved.items():
        assert torch.equal(params[n], v), n


def _replicated_experts_worker(rank: int, world: int, port: int, out: str) -> None:
    """Four ranks, experts over pairs (--ep 2): each expert lives on two ranks, whose gradients
    must be summed before the world average."""
    info = init_rank(rank, world, port)
    cfg = config("uniter", moe="switch", experts=4, ep=2, capacity_factor=4.0)
    model = parallelize(make_model("uniter"), info, cfg)
    optimizer, scheduler = optimizer_for(model, cfg)
    curve = []
    for s in range(3):
        m = step(model, optimizer, scheduler, [split(make_batch("uniter", s), world)[rank]])
        loss = torch.tensor(m["loss"])
        torch.distributed.all_reduce(loss)
        curve.append({"loss": float(loss) / world, "grad_norm": m["grad_norm"]})
    if rank == 0:
        Path(out).write_text(json.dumps(curve))
    trainer.shutdown()


def test_experts_replicated_over_expert_parallel_groups(tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "curve.json"
    mp.start_processes(
        _replicated_experts_worker, args=(4, free_port(), str(path)), nprocs=4,
        start_method="fork",
    )  # fmt: skip
    cfg = config("uniter", moe="switch", experts=4, capacity_factor=4.0)
    model = apply_moe(make_model("uniter"), ParallelConfig.of(cfg))
    optimizer, scheduler = optimizer_for(model, cfg)
    want = [step(model, optimizer, scheduler, split(make_batch("uniter", s), 4)) for s in range(3)]
    for a, b in zip(json.loads(path.read_text()), want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_moe_run_logs_routing_and_memory(tmp_path):
    from test_train_data import make_shards

    shards = make_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train", "--recipe", "uniter", "--shards", shards, "--out", str(out), "--steps", "2",
        "--batch-size", "4", "--workers", "0", "--log-every", "1", "--no-progress",
        "--vocab-size", "120", "--moe", "switch", "--experts", "4", "--capacity-factor", "1.0",
    )  # fmt: skip
    assert code == 0, err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["param_bytes"] > 0 and records[0]["optim_bytes"] > records[0]["param_bytes"]
    assert "param_bytes" not in records[1]
    for r in records:
        loads = [r[f"moe_load_e{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0) and 0.0 <= r["moe_dropped"] < 1.0
        assert r["moe_aux"] > 0 and math.isfinite(r["loss"])
    model, _, _ = trainer.load_for_eval(out)
    assert sum(1 for _ in moe_layers(model)) == 2
    code, _, err = run_cli("train", "--recipe", "uniter", "--shards", shards, "--out",
                           str(tmp_path / "bad"), "--moe", "switch", "--experts", "6", "--ep", "4")  # fmt: skip
    assert code == 2 and "--ep 4 does not divide --experts 6" in err
