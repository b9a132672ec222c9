"""A training run's figures from its metrics.jsonl (written by vlforge.train.trainer.MetricsLog).

Train records are `{"step", "loss", <task losses>, "lr", "samples_per_s", "grad_norm", ...}`;
evaluation records are `{"step", "eval": {metric: value}}`. Keys are not fixed (each recipe logs
its own tasks, MoE runs add load figures), so they are sorted into groups by name: anything
starting with `moe_` goes to the MoE panel, with nested dicts and lists of per-expert values
flattened (`moe_load.layer0[3]`) so one series is drawn per expert whatever the layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.errors import UserError

# Keys that are not task losses; everything else numeric in a train record is one.
NON_TASK_KEYS = frozenset({"step", "loss", "lr", "samples_per_s", "grad_norm", "epoch", "time"})


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass
class RunFigures:
    path: Path
    records: int
    train: dict[str, Series]  # every numeric train key
    eval: dict[str, Series]
    config: dict[str, Any]

    @property
    def last_step(self) -> int:
        steps = [s.steps[-1] for s in (*self.train.values(), *self.eval.values()) if s.steps]
        return max(steps, default=0)

    @property
    def task_keys(self) -> list[str]:
        return sorted(k for k in self.train if k not in NON_TASK_KEYS and not k.startswith("moe_"))

    @property
    def moe_load_keys(self) -> list[str]:
        return sorted((k for k in self.train if k.startswith("moe_load")), key=_natural)

    @property
    def moe_other_keys(self) -> list[str]:
        return sorted(
            k for k in self.train if k.startswith("moe_") and not k.startswith("moe_load")
        )


def _natural(key: str) -> tuple:
    """moe_load[2] before moe_load[10]."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numbers under `prefix`; dicts add `.name`, lists add `[i]`; others are dropped."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            flatten(f"{prefix}[{i}]", v, out)


def read_run(run: Path) -> RunFigures:
    path = run / "metrics.jsonl"
    train: dict[str, Series] = {}
    evals: dict[str, Series] = {}
    records = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            raise UserError(f"{path}:{number}: a record without a step")
        records += 1
        step = int(record["step"])
        flat: dict[str, float] = {}
        is_eval = isinstance(record.get("eval"), dict)
        flatten("", record["eval"] if is_eval else record, flat)
        target = evals if is_eval else train
        for key, value in flat.items():
            if key != "step":
                target.setdefault(key, Series()).add(step, value)
    config: dict[str, Any] = {}
    if (run / "config.json").is_file():
        try:
            config = json.loads((run / "config.json").read_text())
        except ValueError:
            config = {}
    return RunFigures(path=run, records=records, train=train, eval=evals, config=config)
