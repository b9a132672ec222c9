"""`vlforge featurize` and `vlforge mine` on Beam's DaskRunner, over a dask.distributed cluster of
separate worker processes: their outputs equal the DirectRunner's, byte for byte.

Also the two DaskRunner defects vlforge works around (pipeline/dask_fixes.py) and the featurize
device choice.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from distributed import Client, LocalCluster

from tests.conftest import run_cli
from tests.test_featurize_stage import CLASSES, sample
from tests.test_mine_stage import world_rows, write_shards
from vlforge.errors import UserError
from vlforge.featurize.detector import DetectorConfig, build_detector, choose_device, save_detector
from vlforge.featurize.shards import read_raw_samples, write_shard
from vlforge.pipeline.beam_options import build_options
from vlforge.pipeline.dask_fixes import close_client


@pytest.fixture(scope="module")
def dask_address():
    """A two-worker cluster of separate processes (one thread each) on 127.0.0.1."""
    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


def dask_flags(address: str) -> list[str]:
    return ["--runner", "DaskRunner", "--dask_client_address", address]


def workers_imported(address: str, module: str) -> list[bool]:
    """Whether each worker process has `module` loaded (it ran, or unpickled, our DoFns)."""
    with Client(address) as client:
        return list(client.run(lambda: module in sys.modules).values())


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def tars(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


# ---- mine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mine_input(tmp_path_factory):
    from vlforge.featurize.scene_graph import SceneGraphParser

    src = tmp_path_factory.mktemp("mine-in")
    write_shards(src, world_rows(150), SceneGraphParser())
    return src


def test_mine_on_dask_equals_direct(mine_input, dask_address, tmp_path):
    direct, dask = tmp_path / "direct", tmp_path / "dask"
    code, _, err = run_cli("mine", "--in", str(mine_input), "--out", str(direct), "--no-progress")
    assert code == 0, err
    flags = dask_flags(dask_address)
    code, out, err = run_cli(
        "mine", "--in", str(mine_input), "--out", str(dask), "--no-progress", *flags
    )
    assert code == 0, err
    assert "vlforge mine: 152 samples in 4 shard(s)" in out
    expected = tars(direct)
    assert len(expected) == 4 and tars(dask) == expected  # keys, fields, mine.json: all bytes
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (direct, dask)]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    assert manifests[0]["figures"] == manifests[1]["figures"]
    assert any(workers_imported(dask_address, "vlforge.pipeline.mine_shard"))


# ---- featurize -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def featurize_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("featurize-in")
    src = root / "in"
    src.mkdir()
    odd = sample(2, **{"sg.json": {"objects": []}, "extra.pyd": pickle.dumps({"x": 1})})
    broken = sample(4)
    broken["jpg"] = broken["jpg"][:200]
    write_shard(str(src / "corpus-000000.tar"), [sample(0), sample(1), odd])
    write_shard(str(src / "corpus-000001.tar"), [sample(3), broken, sample(5), sample(6)])
    torch.manual_seed(0)
    weights = root / "det.pt"
    save_detector(build_detector(CLASSES), str(weights), CLASSES, DetectorConfig())
    return src, weights


def _featurize(src: Path, weights: Path, out: Path, *extra: str) -> dict:
    code, _, err = run_cli(
        "featurize",
        "--in",
        str(src),
        "--out",
        str(out),
        "--weights",
        str(weights),
        "--batch-size",
        "2",
        *extra,
    )
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_featurize_on_dask_equals_direct(featurize_input, dask_address, tmp_path):
    src, weights = featurize_input
    direct = _featurize(src, weights, tmp_path / "direct")
    dask = _featurize(src, weights, tmp_path / "dask", *dask_flags(dask_address))
    expected = tars(tmp_path / "direct")
    assert len(expected) == 2 and tars(tmp_path / "dask") == expected
    assert dask["counts"] == direct["counts"]
    assert dask["counts"]["images"] == 7 and dask["counts"]["empty_with_reason"] == 1
    assert dask["devices"] == direct["devices"] == ["cpu"]  # no GPU here: auto picked the CPU
    keys = [s["__key__"] for s in read_raw_samples(str(tmp_path / "dask" / "corpus-000001.tar"))]
    assert keys == ["k0003", "k0004", "k0005", "k0006"]
    assert not list((tmp_path / "dask").glob(".*"))  # no part or temporary files left
    assert any(workers_imported(dask_address, "vlforge.featurize.shard_stage"))


def test_featurize_parts_reassemble_to_the_one_part_shards(featurize_input, tmp_path):
    """DirectRunner with more workers than shards splits shards into interleaved parts; the
    assembled shards hold the same samples in the same order as one part per shard."""
    src, weights = featurize_input
    whole = _featurize(src, weights, tmp_path / "whole")
    parted = _featurize(src, weights, tmp_path / "parted", "--workers", "3")
    assert whole["config"]["parts_per_shard"] == 1 and parted["config"]["parts_per_shard"] == 6
    for name in ("corpus-000000.tar", "corpus-000001.tar"):
        a = list(read_raw_samples(str(tmp_path / "whole" / name)))
        b = list(read_raw_samples(str(tmp_path / "parted" / name)))
        assert [s["__key__"] for s in b] == [s["__key__"] for s in a]
        for x, y in zip(a, b, strict=True):
            assert set(x) == set(y)
            regions = {"boxes.npy", "feats.npy", "cls_prob.npy", "tags.json", "json"}
            assert {k: x[k] for k in set(x) - regions} == {k: y[k] for k in set(y) - regions}
            # Parts batch other images together: regions agree to float rounding only.
            for field in ("boxes.npy", "feats.npy"):
                np.testing.assert_allclose(_npy(y[field]), _npy(x[field]), atol=1e-2)
    assert parted["counts"] == whole["counts"]
    assert not list((tmp_path / "parted").glob(".*"))


# ---- the DaskRunner defects worked around ------------------------------------------------------


def _record(value, path: str) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(value) + "\n")


def test_dask_side_input_sees_each_element_once(dask_address, tmp_path):
    """A side input computed from the same PCollection as the main input: on the unpatched
    runner the second bundle of a ParDo in one process also returned the first one's outputs,
    so the sum below came out doubled."""
    path = str(tmp_path / "seen.jsonl")
    options = build_options(dask_flags(dask_address), 1)
    with beam.Pipeline(options=options) as pipeline:
        numbers = pipeline | beam.Create([1, 2, 3, 4]) | "Same" >> beam.Map(lambda x: x)
        total = numbers | beam.CombineGlobally(sum)
        _ = (
            numbers
            | "Pair" >> beam.Map(lambda x, t: (x, t), beam.pvalue.AsSingleton(total))
            | "Record" >> beam.Map(_record, path)
        )
    close_client(pipeline.result)
    seen = sorted(tuple(json.loads(line)) for line in Path(path).read_text().splitlines())
    assert seen == [(1, 10), (2, 10), (3, 10), (4, 10)]


def test_dask_runner_flags_are_known_and_checked():
    options = build_options(["--runner", "DaskRunner", "--dask_client_address", "x:1"], 1)
    assert options.get_all_options()["runner"].endswith("dask_runner.DaskRunner")
    with pytest.raises(UserError, match="unrecognized arguments: --dask_no_such_flag"):
        build_options(["--runner", "DaskRunner", "--dask_no_such_flag", "1"], 1)
    assert isinstance(options, PipelineOptions)


# ---- device --------------------------------------------------------------------------------


def test_device_auto_follows_torch_and_cpu_forces_cpu(monkeypatch):
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto").type == "cuda"  # a worker with a GPU uses it
    assert choose_device("cpu").type == "cpu"  # unless told not to
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto").type == "cpu"
    with pytest.raises(UserError, match="torch sees no GPU"):
        choose_device("cuda")
    with pytest.raises(UserError, match="--device must be one of"):
        choose_device("tpu")


def test_featurize_device_flag(featurize_input, tmp_path):
    src, weights = featurize_input
    manifest = _featurize(src, weights, tmp_path / "cpu", "--device", "cpu")
    assert manifest["config"]["device"] == "cpu" and manifest["devices"] == ["cpu"]
    code, _, err = run_cli(
        "featurize", "--in", str(src), "--out", str(tmp_path / "x"), "--weights", str(weights),
        "--device", "tpu",
    )  # fmt: skip
    assert code == 2 and "invalid choice: 'tpu'" in err
