"""Scaling by configuration: what ZeRO shards and what MoE costs; appends two rows to
bench/results.md.

1. Per-rank bytes of parameters, gradients and AdamW state of `uniter` for 1, 2 and 4 gloo ranks
   at ZeRO stages 0-3 (measured after one step), next to the ZeRO paper's formulas for fp32
   Adam (Ψ parameters, N ranks: stage 0 holds 4Ψ + 4Ψ + 8Ψ bytes; stage 1 divides the 8Ψ of
   optimizer state by N, stage 2 also the gradients, stage 3 everything).
2. Training step time and samples/s of the dense model against Switch (top-1) MoE layers with 4
   and 8 experts in every FFN — the same active parameters per token — and the share of tokens
   dropped at capacity factors 1.0, 1.25 and 2.0. Steps of the models are interleaved so a
   shared machine's load falls on all alike; median step times.

    .venv/bin/python bench/bench_scaling.py              # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import record  # noqa: E402

from vlforge.train import trainer  # noqa: E402
from vlforge.train.distributed import free_port, parallelize  # noqa: E402
from vlforge.train.parallel import ParallelConfig  # noqa: E402
from vlforge.train.parallel.memory import rank_bytes  # noqa: E402
from vlforge.train.parallel.moe import apply_moe, take_moe_outputs  # noqa: E402
from vlforge.train.recipes import build_recipe  # noqa: E402

DIMS = dict(hidden=256, layers=4, heads=4, mlp=1024, region_dim=256, num_region_classes=64)
VOCAB, MB = 4000, 2**20


def make_model(dims: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    # MLM + ITM on every batch (as bench_train_step): every trained parameter gets a gradient.
    return build_recipe(
        "uniter", "base", VOCAB, tasks={"mlm": 1.0, "itm": 1.0}, task_mode="sum", ot_weight=0.0,
        dropout=0.0, attn_dropout=0.0, **dims,
    )  # fmt: skip


def make_batch(b: int, length: int, regions: int, dim: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    labels = torch.full((b, length), -100)
    pick = torch.rand(b, length, generator=g) < 0.15
    pick[:, 1] = True
    labels[pick] = ids[pick]
    ids[pick] = 3
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "token_type_ids": torch.zeros(b, length, dtype=torch.long),
        "mlm_labels": labels,
        "region_feats": torch.randn(b, regions, dim, generator=g),
        "region_geom": torch.rand(b, regions, 7, generator=g),
        "region_mask": torch.ones(b, regions, dtype=torch.long),
        "itm_labels": (torch.rand(b, generator=g) < 0.5).long(),
    }


# ---------------------------------------------------------------------------------------------
# 1. ZeRO: per-rank bytes


def _bytes_after_one_step(model, cfg, batch) -> dict[str, int]:
    optimizer = trainer.build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer.train_step(model, optimizer, scheduler, [batch], "fp32", 1.0, torch.device("cpu"))
    return rank_bytes(model, optimizer)


def _zero_worker(rank: int, world: int, port: int, out: str, batch_size: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = trainer.init_distributed("cpu")
    from vlforge.train import checkpoint as ckpt

    rows = {}
    batch = make_batch(batch_size // world, 16, 12, DIMS["region_dim"], rank)
    for stage in range(4):
        cfg = trainer.TrainConfig(recipe="uniter", shards="-", out="-", zero=stage)
        model = parallelize(make_model(DIMS), info, cfg)
        sizes = ckpt.gather(_bytes_after_one_step(model, cfg, batch))
        rows[stage] = {k: max(s[k] for s in sizes) for k in sizes[0]}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    trainer.shutdown()


def zero_bytes(worlds: list[int], batch_size: int) -> tuple[dict, dict[str, float]]:
    cfg = trainer.TrainConfig(recipe="uniter", shards="-", out="-")
    model = make_model(DIMS)
    one = _bytes_after_one_step(model, cfg, make_batch(batch_size, 16, 12, DIMS["region_dim"], 0))
    psi = {
        "P": sum(p.numel() for p in model.parameters()),
        "G": sum(p.numel() for p in model.parameters() if p.grad is not None),
    }
    measured = {1: {s: one for s in range(4)}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            if world == 1:
                continue
            path = f"{tmp}/w{world}.json"
            mp.start_processes(
                _zero_worker, args=(world, free_port(), path, batch_size), nprocs=world,
                start_method="fork",
            )  # fmt: skip
            measured[world] = {int(k): v for k, v in json.loads(Path(path).read_text()).items()}
    return measured, psi


def formula(stage: int, n: int, psi: dict[str, float]) -> dict[str, float]:
    """The ZeRO paper's per-rank bytes for fp32 AdamW (4 B/param; 8 B of state: two moments)."""
    return {
        "param_bytes": 4 * psi["P"] / (n if stage >= 3 else 1),
        "grad_bytes": 4 * psi["G"] / (n if stage >= 2 else 1),
        "optim_bytes": 8 * psi["G"] / (n if stage >= 1 else 1),
    }


# ---------------------------------------------------------------------------------------------
# 2. MoE: throughput at equal active parameters, dropped share by capacity factor


def moe_runs(args) -> tuple[dict[str, float], dict[str, float], dict[float, float]]:
    variants = {"dense": None, "switch4": (4, 1.25), "switch8": (8, 1.25)}
    variants |= {f"switch8_c{c}": (8, c) for c in (1.0, 2.0)}
    models, params = {}, {}
    for name, v in variants.items():
        model = make_model(DIMS)
        if v is not None:
            apply_moe(model, ParallelConfig(moe="switch", experts=v[0], capacity_factor=v[1]))
        models[name] = model
        params[name] = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    batches = [make_batch(args.batch, 24, 36, DIMS["region_dim"], s) for s in range(4)]
    times: dict[str, list[float]] = {k: [] for k in models}
    dropped: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for name, model in models.items():
            timed = i >= args.warmup and name in ("dense", "switch4", "switch8")
            if not timed and i >= args.warmup + 4:
                continue  # the capacity-factor variants only need a few steps of statistics
            model.train()
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            out = take_moe_outputs(model, model(batches[i % 4]))
            out["loss"].backward()
            opts[name].step()
            if timed:
                times[name].append(time.perf_counter() - t0)
            if "moe_dropped" in out and i >= args.warmup:
                dropped[name].append(float(out["moe_dropped"]))
    rate = {k: args.batch / statistics.median(v) for k, v in times.items() if v}
    by_factor = {
        1.0: statistics.mean(dropped["switch8_c1.0"]),
        1.25: statistics.mean(dropped["switch8"]),
        2.0: statistics.mean(dropped["switch8_c2.0"]),
    }
    return rate, params, by_factor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--zero-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    worlds = [int(w) for w in args.worlds.split(",")]

    measured, psi = zero_bytes(worlds, args.zero_batch)
    print(f"uniter hidden {DIMS['hidden']}, {DIMS['layers']} layers: Ψ = {psi['P']:,} parameters "
          f"({psi['G']:,} trained by MLM+ITM)")  # fmt: skip
    print("world stage   params MB (ZeRO)   grads MB (ZeRO)   AdamW MB (ZeRO)")
    for n in worlds:
        for stage in range(4):
            got, want = measured[n][stage], formula(stage, n, psi)
            cells = [
                f"{got[k] / MB:7.2f} ({want[k] / MB:6.2f})"
                for k in ("param_bytes", "grad_bytes", "optim_bytes")
            ]
            print(f"{n:5d} {stage:5d}   " + "   ".join(cells))
    top = max(worlds)

    def total(stage: int, n: int) -> float:
        return sum(measured[n][stage].values())

    shrink = total(3, top) / total(0, top)
    zero_cells = "; ".join(
        f"N={n}: " + "/".join(f"{total(s, n) / MB:.1f}" for s in range(4)) for n in worlds
    )
    ideal = "; ".join(
        f"N={n}: " + "/".join(f"{sum(formula(s, n, psi).values()) / MB:.1f}" for s in range(4))
        for n in worlds
    )
    print(f"stage 3 / stage 0 per rank at N={top}: {shrink:.3f} (1/N = {1 / top:.3f})")
    print("(stage 2's parameters are measured at rest: FSDP2 gathers them whole for forward and "
          "keeps them until backward ends, the paper's 4Ψ, then frees them)")  # fmt: skip

    rate, params, drops = moe_runs(args)
    ratio = {k: rate[k] / rate["dense"] for k in rate}
    for k in rate:
        print(f"{k:8s} {rate[k]:7.1f} samples/s ({ratio[k]:.2f}× dense), "
              f"FFN params {params[k] / 1e6:.2f} M ({params[k] / params['dense']:.1f}×)")  # fmt: skip
    print("dropped share (switch, 8 experts): " + ", ".join(
        f"c={c}: {d:.3f}" for c, d in drops.items()))  # fmt: skip

    if args.no_write:
        return
    record(
        "scaling: ZeRO per-rank bytes (params+grads+AdamW)",
        f"uniter hidden {DIMS['hidden']}, {DIMS['layers']} layers, Ψ={psi['P'] / 1e6:.2f} M fp32; "
        f"gloo CPU ranks; stages 0/1/2/3 in MB, measured after one step",
        zero_cells,
        f"ZeRO paper 4Ψ+4Ψ+8Ψ sharded by stage: {ideal}",
        f"stage 3/stage 0 at N={top}: {shrink:.3f} (1/N {1 / top:.3f})",
    )
    record(
        "scaling: Switch MoE vs dense training step",
        f"uniter hidden {DIMS['hidden']}, {DIMS['layers']} layers, batch {args.batch}, 24 tokens + "
        f"36 regions; top-1 experts in every FFN (same active params/token); capacity 1.25; "
        f"{args.threads} thread(s); median of {args.steps} steps",
        f"switch4 {rate['switch4']:.1f}, switch8 {rate['switch8']:.1f} samples/s "
        f"({params['switch8'] / params['dense']:.1f}× FFN params); dropped at c=1.0/1.25/2.0: "
        + "/".join(f"{d:.3f}" for d in drops.values()),
        f"dense {rate['dense']:.1f} samples/s",
        f"switch8/dense {ratio['switch8']:.2f}x (switch4 {ratio['switch4']:.2f}x)",
    )


if __name__ == "__main__":
    main()
