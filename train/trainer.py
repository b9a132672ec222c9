"""The trainer: `vlforge train --recipe NAME --shards PATTERN --out DIR`.

Data (train/data.py, collate.py), model (train/recipes/) and parallelism (train/distributed.py)
stay apart; `train_step` is the loss/backward/update of one step and `run` the loop around it.
A resumed run restores model, optimizer, scheduler, RNG and data position, so its loss curve is
the uninterrupted one (exactly, on CPU in one process).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlforge.errors import UserError
from vlforge.train import checkpoint as ckpt
from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.data import Loader, StreamConfig, expand_shards, iter_shard
from vlforge.train.decode import decode_sample
from vlforge.train.device import autocast_dtype
from vlforge.train.distributed import (
    DistInfo,
    barrier,
    data_parallel,
    init_distributed,
    parallelize,
    shutdown,
    unwrap,
)
from vlforge.train.masking import MaskingConfig
from vlforge.train.parallel import ParallelConfig
from vlforge.train.parallel.clip import clip_grad_norm_
from vlforge.train.parallel.memory import rank_bytes
from vlforge.train.parallel.moe import apply_moe, take_moe_outputs
from vlforge.train.parallel.zero import zero_optimizer
from vlforge.train.schedule import build_scheduler
from vlforge.train.tokenizer import (
    TextTokenizer,
    corpus_captions,
    load_tokenizer,
    train_wordpiece,
)


@dataclass
class TrainConfig:
    recipe: str
    shards: str
    out: str
    size: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    total_steps: int | None = None  # schedule length; default: steps
    batch_size: int = 32  # global: over ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0  # max gradient norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 on GPUs that have it) | bf16 | fp32
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    shard_order: str = "epochs"
    shuffle_buffer: int = 1000
    units_per_chunk: int = 4
    data_streams: int = 0  # canonical streams of a global batch; 0: the batch size's divisor ≤ 32
    tokenizer: str | None = None  # a tokenizer.json; default: WordPiece trained on the shards
    vocab_size: int = 8000
    tokenizer_samples: int = 200_000
    max_text_len: int = 40
    max_regions: int = 100
    image_size: int | None = None  # default: the recipe's, else 224
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    log_every: int = 10
    save_every: int = 0  # 0: at the end only
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_shards: str | None = None
    eval_candidates: int = 100
    resume: bool = False
    progress: bool = True
    # Scaling (train/parallel/): ZeRO stage, tensor/expert-parallel ranks, MoE layers.
    zero: int = 0
    tp: int = 1
    ep: int = 1
    moe: str | None = None
    experts: int = 8
    top_k: int | None = None
    capacity_factor: float | None = None
    moe_every: int = 1

    def __post_init__(self) -> None:
        ParallelConfig.of(self).check()
        self.total_steps = self.total_steps or self.steps
        for name in ("steps", "batch_size", "grad_accum", "total_steps", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.total_steps < self.steps:
            raise UserError("--total-steps must be at least --steps")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"--precision must be auto, bf16 or fp32, not {self.precision}")


def build_recipe(name: str, size: str, vocab_size: int, **overrides: Any) -> nn.Module:
    """The recipe registry of train/recipes (imported late: the trainer does not depend on it)."""
    from vlforge.train.recipes import build_recipe as registry_build

    try:
        return registry_build(name, size=size, vocab_size=vocab_size, **overrides)
    except ValueError as exn:  # unknown recipe, size or config field: the user's flags
        raise UserError(str(exn).splitlines()[0]) from None


# ---------------------------------------------------------------------------------------------
# One step


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, Any]],
    precision: str,
    clip_grad: float,
    device: torch.device,
) -> dict[str, float]:
    """Forward/backward over the accumulation micro-batches, clip, update. Returns the step's
    losses (mean over micro-batches; a sampled task's loss over the micro-batches that ran it)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logged: dict[str, list[float]] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP all-reduces gradients only on the last micro-batch of the step.
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        batch = dict(batch)
        seed = batch.pop("_seed", None)
        if seed is not None:
            # In-forward randomness (dropout, sampled patches) from the micro-batch's place in
            # the global batch, not from the rank: the same at any rank count.
            torch.manual_seed(seed)
        with sync:
            with autocast(precision, device):
                out = model(to_device(batch, device))
            out = take_moe_outputs(model, out)  # MoE layers' aux losses join the total
            (out["loss"] / len(micro_batches)).backward()
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                logged.setdefault(k, []).append(float(v.detach().float()))
    metrics = {k: sum(v) / len(v) for k, v in logged.items()}
    if clip_grad > 0:
        metrics["grad_norm"] = clip_grad_norm_(model.parameters(), clip_grad)  # DTensor-aware
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return metrics


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms and scalars (e.g. CLIP's temperature) get no weight decay. With
    --zero 1 over several ranks, ZeroRedundancyOptimizer shards its state."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = dict(lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    dist = torch.distributed
    if cfg.zero == 1 and dist.is_initialized() and dist.get_world_size() > 1:
        return zero_optimizer(groups, torch.optim.AdamW, **kw)
    return torch.optim.AdamW(groups, **kw)


# ---------------------------------------------------------------------------------------------
# Setup: tokenizer, recipe, batch spec, loader


def first_sample(urls: list[str], required: tuple[str, ...]) -> dict[str, Any]:
    for url in urls[:8]:
        for raw in iter_shard(url):
            if all(f in raw for f in required):
                return decode_sample(raw, required)
    raise UserError(f"no sample in the first shards has all of {list(required)}")


def prepare_tokenizer(cfg: TrainConfig, urls: list[str], info: DistInfo) -> TextTokenizer:
    """The given tokenizer.json, else the run's own (DIR/tokenizer.json), else a WordPiece trained
    on the training captions by rank 0 and saved there."""
    own = Path(cfg.out) / "tokenizer.json"
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        if info.is_main and Path(cfg.tokenizer).resolve() != own.resolve():
            shutil.copyfile(cfg.tokenizer, own)
        return tok
    if info.is_main and not own.is_file():
        captions = list(corpus_captions(urls, cfg.tokenizer_samples))
        if not captions:
            raise UserError("the shards hold no captions to train a tokenizer on")
        train_wordpiece(captions, cfg.vocab_size).save(own)
    barrier()
    return load_tokenizer(own)


def recipe_attr(recipe: nn.Module, name: str, default: Any) -> Any:
    return getattr(recipe, name, default)


def recipe_masking(recipe: nn.Module, chosen: MaskingConfig) -> MaskingConfig:
    """The run's masking with the recipe's declared choices (`masking_defaults`, e.g. ViLT's
    whole-word MLM and image-swap negatives) in the fields the run left at their defaults."""
    default, own = MaskingConfig(), recipe_attr(recipe, "masking_defaults", {})
    kept = {k: v for k, v in own.items() if getattr(chosen, k) == getattr(default, k)}
    return replace(chosen, **kept)


def batch_spec(recipe: nn.Module, cfg: TrainConfig) -> BatchSpec:
    """The recipe's declared needs (inputs, tasks, geometry, masking rules) + the data flags."""
    return BatchSpec(
        inputs=frozenset(recipe.inputs),
        tasks=dict(recipe.tasks),
        task_mode=recipe.task_mode,
        geometry=int(recipe.geometry),
        region_mask_overlap=bool(recipe_attr(recipe, "region_mask_overlap", False)),
        conditional_masking=bool(recipe_attr(recipe, "conditional_masking", False)),
        # No longer than the recipe's position table.
        max_text_len=min(cfg.max_text_len, getattr(getattr(recipe, "cfg", None), "max_len", 10**9)),
        max_regions=cfg.max_regions,
        image_size=cfg.image_size or int(recipe_attr(recipe, "image_size", 224)),
        masking=recipe_masking(recipe, cfg.masking),
        extra_fields=tuple(recipe_attr(recipe, "extra_fields", ())),
        hook=getattr(type(recipe), "batch_hook", None),  # the plain function, not bound
    )


def data_overrides(sample: dict[str, Any]) -> dict[str, Any]:
    """Sizes the recipe takes from the data: region feature width and detector classes."""
    out: dict[str, Any] = {}
    if "feats.npy" in sample:
        out["region_dim"] = int(sample["feats.npy"].shape[1])
    if "cls_prob.npy" in sample:
        out["num_region_classes"] = int(sample["cls_prob.npy"].shape[1])
    return out


def make_loader(
    cfg: TrainConfig,
    urls: list[str],
    spec: BatchSpec,
    tok: TextTokenizer,
    info: DistInfo,
    state: list[dict[str, Any]] | None,
) -> Loader:
    fields, required = spec.fields()
    stream = StreamConfig(
        tuple(urls),
        seed=cfg.seed,
        order=cfg.shard_order,
        shuffle_buffer=cfg.shuffle_buffer,
        units_per_chunk=cfg.units_per_chunk,
    )
    return Loader(
        stream,
        Assembler(spec, tok),
        cfg.batch_size,
        num_workers=cfg.workers,
        rank=info.rank,
        world_size=info.world_size,
        fields=fields,
        required=required,
        state=state,
        grad_accum=cfg.grad_accum,
        streams=cfg.data_streams,
    )


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """DIR/metrics.jsonl (rank 0), TensorBoard when installed. On resume, records after the
    checkpoint's step are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, info: DistInfo, resume_step: int | None):
        self.path, self.main = out / "metrics.jsonl", info.is_main
        self.tb = None
        if not self.main:
            return
        if resume_step is not None and self.path.is_file():
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif self.path.is_file():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            scalars = record.get("eval") or record
            prefix = "eval" if "eval" in record else "train"
            for k, v in scalars.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Averages each key over the ranks that logged it (ranks may differ in task keys)."""
    per_rank = ckpt.gather(metrics)
    keys = sorted({k for m in per_rank for k in m})
    return {k: sum(m[k] for m in per_rank if k in m) / sum(k in m for m in per_rank) for k in keys}


# ---------------------------------------------------------------------------------------------
# The run


def write_config(cfg: TrainConfig, out: Path, extra: dict[str, Any]) -> None:
    record = asdict(cfg) | extra
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out / "config.json")


def run(cfg: TrainConfig) -> dict[str, Any]:
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info)
    finally:
        shutdown()


def _run(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    dp = data_parallel(info, cfg)  # tensor-parallel ranks share batches and random draws
    if cfg.eval_every and cfg.eval_shards and info.distributed and ParallelConfig.of(cfg).sharded:
        raise UserError(
            "--eval-every evaluates on rank 0 alone, which a model sharded by --zero 2/3, --tp or "
            "--ep cannot do; evaluate its checkpoints with `vlforge eval`"
        )
    if cfg.batch_size % (dp.world_size * cfg.grad_accum):
        raise UserError(
            f"--batch-size {cfg.batch_size} does not split over {dp.world_size} ranks × "
            f"{cfg.grad_accum} accumulation steps"
        )
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and not cfg.resume:
        raise UserError(f"{out} already holds a run ({latest.name}); pass --resume or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_shards(cfg.shards)

    # Model: the same initial weights on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    tok = prepare_tokenizer(cfg, urls, info)
    probe = build_recipe(cfg.recipe, cfg.size, tok.vocab_size, **cfg.overrides)
    spec = batch_spec(probe, cfg)
    sample = first_sample(urls, spec.fields()[1])
    sized = data_overrides(sample) | cfg.overrides
    torch.manual_seed(cfg.seed)
    recipe = build_recipe(cfg.recipe, cfg.size, tok.vocab_size, **sized)
    del probe
    if info.is_main:
        write_config(cfg, out, {"vocab_size_actual": tok.vocab_size, "recipe_overrides": sized})
    model = parallelize(recipe, info, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(
        optimizer, cfg.schedule, cfg.warmup, cfg.total_steps, cfg.min_lr_ratio
    )
    # Dropout differs per rank; a resumed run takes the RNG state from its checkpoint instead.
    torch.manual_seed(cfg.seed + 1 + dp.rank)

    step, data_state, rng_state = 0, None, None
    if latest is not None:
        restored = ckpt.load_checkpoint(latest, model, optimizer)
        step = restored["step"]
        state = restored["state"]
        if state:
            none = [None] * len(scheduler.lr_lambdas)  # keep this run's schedule shape
            scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": none})
            # The restored optimizer holds the old run's lr; this run's schedule sets it.
            for group, base, fn in zip(
                optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * fn(scheduler.last_epoch)
        # Every rank's stream positions: together they resume at any rank count.
        data_state = [s["data"] for s in restored["ranks"] if s] or None
        if state and restored["world_size"] == info.world_size:
            rng_state = state["rng"]
    if step >= cfg.steps:
        raise UserError(f"{out} is already at step {step}; raise --steps to train further")

    loader = make_loader(cfg, urls, spec, tok, dp, data_state)
    if rng_state is not None:
        ckpt.set_rng_state(rng_state)
    log = MetricsLog(out, info, step if latest is not None else None)
    evaluate = _evaluator(cfg, recipe, tok, spec, info)
    summary = _loop(cfg, info, model, optimizer, scheduler, loader, log, evaluate, step)
    log.close()
    return summary


def _evaluator(
    cfg: TrainConfig, recipe: nn.Module, tok: TextTokenizer, spec: BatchSpec, info: DistInfo
) -> Callable[[], dict[str, float]] | None:
    if not (cfg.eval_every and cfg.eval_shards):
        return None
    from vlforge.train.evaluate import evaluate

    def run_eval() -> dict[str, float]:
        return evaluate(recipe, tok, spec, cfg.eval_shards, n_candidates=cfg.eval_candidates)

    return run_eval


def _next_step_batches(batches: Iterator[dict], n: int) -> list[dict]:
    try:
        return [next(batches) for _ in range(n)]
    except StopIteration:
        raise UserError(
            "the shards yielded no more samples (are they empty or unreadable?)"
        ) from None


def _loop(
    cfg: TrainConfig,
    info: DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Loader,
    log: MetricsLog,
    evaluate: Callable[[], dict[str, float]] | None,
    step: int,
) -> dict[str, Any]:
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps, initial=step, disable=not (cfg.progress and info.is_main), unit="step"
    )
    batches = iter(loader)
    start, since, tick = step, step, time.perf_counter()
    t0 = tick
    metrics: dict[str, float] = {}
    window: dict[str, list[float]] = {}
    window_sized = start > 0  # a resumed run's first record was written before it stopped
    while step < cfg.steps:
        micro = _next_step_batches(batches, cfg.grad_accum)
        metrics = train_step(
            model, optimizer, scheduler, micro, cfg.precision, cfg.clip_grad, info.device
        )
        step += 1
        bar.update(1)
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        if step % cfg.log_every == 0 or step == cfg.steps:
            # Means over the steps since the last record (a sampled task: over its steps).
            now = time.perf_counter()
            record = mean_over_ranks({k: sum(v) / len(v) for k, v in window.items()})
            record["lr"] = metrics["lr"]
            record["samples_per_s"] = cfg.batch_size * (step - since) / max(now - tick, 1e-9)
            since, tick, window = step, now, {}
            if not window_sized:  # the run's first record: the largest per-rank bytes
                window_sized = True
                sizes = ckpt.gather(rank_bytes(model, optimizer))
                record |= {k: max(s[k] for s in sizes) for k in sizes[0]}
            log.write({"step": step, **record})
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if not math.isfinite(record["loss"]):
                bar.write(f"step {step}: loss is {record['loss']}")
        if evaluate and (step % cfg.eval_every == 0 or step == cfg.steps):
            if info.is_main:
                log.write({"step": step, "eval": evaluate()})
            barrier()
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            # The schedule's shape comes from the flags of the run that resumes, not the saved one.
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            state = {
                "scheduler": sched,
                "rng": ckpt.rng_state(),
                "data": loader.state_dict(),
            }
            ckpt.save_checkpoint(cfg.out, step, model, optimizer, state, cfg.keep_checkpoints)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "rank": info.rank,
        "steps": step,
        "trained_steps": step - start,
        "loss": metrics.get("loss"),
        "seconds": elapsed,
        "samples_per_s": cfg.batch_size * (step - start) / max(elapsed, 1e-9),
        "checkpoint": str(ckpt.latest_checkpoint(cfg.out)),
    }


def load_for_eval(
    path: str | Path, device: str = "cpu"
) -> tuple[nn.Module, TextTokenizer, BatchSpec]:
    """A run directory (its latest checkpoint) or one checkpoint → (model, tokenizer, batch spec)
    rebuilt from the run's config.json and tokenizer.json."""
    path = Path(path)
    if (path / ".metadata").is_file():
        run_dir, point = path.parent.parent, path
    else:
        run_dir, point = path, ckpt.latest_checkpoint(path)
        if point is None:
            raise UserError(f"no checkpoint in {path}")
    config = run_dir / "config.json"
    if not config.is_file():
        raise UserError(f"{run_dir} has no config.json: not a vlforge train run")
    record = json.loads(config.read_text())
    masking = MaskingConfig(**record.pop("masking"))
    overrides = record.pop("recipe_overrides", {})
    record.pop("vocab_size_actual", None)
    cfg = TrainConfig(**{**record, "masking": masking})
    tok = load_tokenizer(run_dir / "tokenizer.json")
    model = build_recipe(cfg.recipe, cfg.size, tok.vocab_size, **overrides)
    apply_moe(model, ParallelConfig.of(cfg))  # the same layers as trained; no sharding
    ckpt.load_model_weights(point, model)
    model.to(torch.device(device)).eval()
    return model, tok, batch_spec(model, cfg)


__all__ = ["TrainConfig", "load_for_eval", "run", "train_step", "unwrap"]
