"""Device, precision and backend choice (train/device.py), checked on this CPU-only machine."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli
from vlforge.errors import UserError
from vlforge.train.device import autocast_dtype, backend_for, pick_device
from vlforge.train.trainer import autocast


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("CPU") == torch.device("cpu")
    assert backend_for(pick_device("auto")) == "gloo"
    assert autocast_dtype("auto", torch.device("cpu")) is None  # fp32 on the CPU
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert isinstance(autocast("bf16", torch.device("cpu")), torch.autocast)


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_clear_error(no_gpu, name):
    with pytest.raises(UserError, match="no CUDA GPU"):
        pick_device(name)


def test_auto_takes_the_ranks_gpu_when_there_is_one(monkeypatch):
    """What a GPU machine sees (torch's CUDA queries stood in for): the local rank's GPU, NCCL,
    bf16 where the GPU has it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    assert backend_for(pick_device("auto")) == "nccl"
    with pytest.raises(UserError, match="GPU 2 asked, 2 present"):
        pick_device("cuda:2")
    for supported, dtype in [(True, torch.bfloat16), (False, None)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert autocast_dtype("auto", torch.device("cuda", 0)) is dtype
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None


@pytest.mark.parametrize("name", ["tpu", "cuda:x", ""])
def test_unknown_devices_are_user_errors(name):
    if name == "":
        assert pick_device(name).type in ("cpu", "cuda")  # empty means auto
        return
    with pytest.raises(UserError, match="auto, cpu, cuda"):
        pick_device(name)


def test_train_cli_says_no_gpu_in_one_line(tmp_path):
    if torch.cuda.is_available():  # on a GPU machine the flag is valid: nothing to refuse
        assert pick_device("cuda").type == "cuda"
        return
    code, _, err = run_cli(
        "train", "--recipe", "uniter", "--shards", str(tmp_path / "x.tar"), "--out",
        str(tmp_path / "run"), "--device", "cuda",
    )  # fmt: skip
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1, err
