"""Shared fixtures: the demo world's server on 127.0.0.1 and a way to run the CLI in-process."""

from __future__ import annotations

import contextlib
import io

import pytest

from vlforge.cli import main


@pytest.fixture(scope="module")
def one_torch_thread():
    """Detector tests at one torch thread: two OpenMP threads on a shared two-core machine stall
    at every barrier; one does not."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world_server():
    from vlforge.world.server import WorldServer

    # Short fault durations: our crawl timeouts in tests are shorter still.
    with WorldServer(hold_seconds=8.0, slow_body_seconds=6.0) as server:
        yield server


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run `vlforge ARGV` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


# Fast versions of the demo crawl settings (vlforge.demo.DEMO_CORPUS_FLAGS) for tests.
FAST_CRAWL = [
    "--preset", "datacomp-basic", "--respect-robots", "--allow-private", "127.0.0.0/8",
    "--timeout", "1.0", "--deadline", "2.0", "--retries", "1", "--backoff", "0.05",
    "--max-bytes", str(8 * 1024 * 1024), "--no-progress", "--threads", "48",
]  # fmt: skip


def loss_falls(model, batch: dict) -> None:
    """Thirty AdamW steps on one fixed batch bring the model's total loss below 70% of its start."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        first = float(model(batch)["loss"])
    for _ in range(30):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = float(model(batch)["loss"])
    assert last < 0.7 * first, (first, last)
