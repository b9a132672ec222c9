"""The featurize Beam stage over WebDataset shards: round trip, empty images, CLI errors."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import vlforge.cli
from tests.conftest import run_cli
from vlforge.featurize.detector import BACKGROUND, DetectorConfig, build_detector, save_detector
from vlforge.featurize.shards import read_raw_samples, safe_decoder, write_shard
from vlforge.world.render import render_scene
from vlforge.world.scene import SHAPES, sample_scene

CLASSES = [BACKGROUND, *SHAPES]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two OpenMP threads on a shared two-core machine stall at every barrier; one does not.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def featurize_cli(monkeypatch):
    if "vlforge.featurize.cli" not in vlforge.cli.STAGE_CLIS:
        monkeypatch.setattr(
            vlforge.cli, "STAGE_CLIS", (*vlforge.cli.STAGE_CLIS, "vlforge.featurize.cli")
        )


def jpeg(index: int, size: tuple[int, int] = (256, 256)) -> bytes:
    buffer = io.BytesIO()
    render_scene(sample_scene(11, index)).resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample(index: int, **extra) -> dict:
    return {
        "__key__": f"k{index:04d}",
        "jpg": jpeg(index),
        "txt": f"caption {index}",
        "json": {"url": f"http://example/{index}", "width": 256, "height": 256},
        **extra,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    """Two shards: 3 + 3 samples, one with a corrupt jpg, one with fields featurize never reads."""
    root = tmp_path_factory.mktemp("featurize")
    src = root / "in"
    src.mkdir()
    # A .pyd field holds a pickle: it must travel as opaque bytes and never be unpickled.
    odd = sample(2, **{"sg.json": {"objects": []}, "extra.pyd": pickle.dumps({"x": 1})})
    broken = sample(4)
    broken["jpg"] = broken["jpg"][:200]
    write_shard(str(src / "corpus-000000.tar"), [sample(0), sample(1), odd])
    write_shard(str(src / "corpus-000001.tar"), [sample(3), broken, sample(5)])
    (src / "corpus-000000.parquet").write_bytes(b"PAR1 stand-in stats")
    torch.manual_seed(0)
    weights = root / "det.pt"
    save_detector(build_detector(CLASSES), str(weights), CLASSES, DetectorConfig())
    return str(src), str(weights)


@pytest.fixture(scope="module")
def featurized(shards, tmp_path_factory) -> tuple[str, dict]:
    from vlforge.featurize.beam_stage import featurize_shards

    src, weights = shards
    out = str(tmp_path_factory.mktemp("out"))
    manifest = featurize_shards(src, out, weights, batch_size=4)
    return out, manifest


def test_manifest_counts(featurized):
    out, manifest = featurized
    assert manifest["counts"]["shards"] == 2
    assert manifest["counts"]["images"] == 6
    assert manifest["counts"]["empty_with_reason"] == 1
    assert manifest["counts"]["regions"] >= 5 * 10
    assert manifest["counts"]["stats_copied"] == 1
    assert manifest["detector"]["cls_prob_background_column"] == 0
    assert set(manifest["versions"]) >= {"torch", "torchvision", "apache_beam", "webdataset"}
    on_disk = json.loads(Path(out, "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]


def test_round_trip_keeps_every_earlier_field(shards, featurized):
    src, _ = shards
    out, _ = featurized
    for name in ("corpus-000000", "corpus-000001"):
        before = list(read_raw_samples(f"{src}/{name}.tar"))
        after = list(read_raw_samples(f"{out}/{name}.tar"))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]  # same order
        written = {"boxes.npy", "feats.npy", "cls_prob.npy", "tags.json", "sg.json"}
        for old, new in zip(before, after, strict=True):
            for field, value in old.items():
                if field != "json" and field not in written:  # this stage's own fields are redone
                    assert new[field] == value, field  # byte for byte
            old_json, new_json = json.loads(old["json"]), json.loads(new["json"])
            assert {k: new_json[k] for k in old_json} == old_json
            assert set(new) == set(old) | written
            graph = json.loads(new["sg.json"])  # the caption's text scene graph
            assert graph["tokens"] and {"objects", "attributes", "relations"} <= set(graph)


def test_plain_webdataset_reads_the_output(featurized):
    out, _ = featurized
    dataset = wds.WebDataset(f"{out}/corpus-000000.tar", shardshuffle=False).map(safe_decoder())
    samples = list(dataset)
    assert len(samples) == 3
    for s in samples:
        n = s["json"]["regions"]["count"]
        assert 10 <= n <= 100
        assert s["boxes.npy"].shape == (n, 4) and s["boxes.npy"].dtype == np.float32
        assert s["feats.npy"].dtype == np.float16 and s["feats.npy"].shape[0] == n
        assert (
            s["cls_prob.npy"].shape == (n, len(CLASSES)) and s["cls_prob.npy"].dtype == np.float16
        )
        np.testing.assert_allclose(s["cls_prob.npy"].astype(np.float64).sum(1), 1.0, atol=5e-3)
        assert np.all(s["boxes.npy"][:, 2:] <= 256)
        assert s["json"]["regions"]["cls_prob_background_column"] == 0
        assert s["json"]["regions"]["class_names"] == CLASSES
        assert isinstance(s["tags.json"]["tags"], list)
        assert isinstance(s["jpg"], np.ndarray) and s["txt"].startswith("caption")
    odd = samples[2]
    assert isinstance(odd["extra.pyd"], bytes)  # the safe decoder left the pickle alone


def test_corrupt_image_gives_empty_regions_with_reason(featurized):
    out, _ = featurized
    broken = {s["__key__"]: s for s in read_raw_samples(f"{out}/corpus-000001.tar")}["k0004"]
    meta = json.loads(broken["json"])["regions"]
    assert meta["count"] == 0 and meta["reason"].startswith("undecodable")
    decode = safe_decoder()
    decoded = decode({k: v for k, v in broken.items() if k != "jpg"})
    assert decoded["boxes.npy"].shape == (0, 4)
    assert decoded["feats.npy"].shape[0] == 0
    assert decoded["cls_prob.npy"].shape == (0, len(CLASSES))
    assert decoded["tags.json"]["tags"] == []


def test_cli_runs_and_reports(shards, tmp_path):
    src, weights = shards
    code, out, err = run_cli(
        "featurize",
        "--in",
        src + "/corpus-000000.tar",
        "--out",
        str(tmp_path / "o"),
        "--weights",
        weights,
    )
    assert code == 0, err
    assert "featurized 3 images in 1 shards" in out
    assert (tmp_path / "o" / "corpus-000000.tar").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--in", "{tmp}/nothing", "--out", "{tmp}/o", "--weights", "{weights}"],
            "no shards match",
        ),
        (
            ["--in", "{src}", "--out", "{tmp}/o", "--weights", "{tmp}/missing.pt"],
            "weights not found",
        ),
        (["--in", "{src}", "--out", "{tmp}/o"], "needs --weights"),
        (["--in", "{src}", "--out", "{src}", "--weights", "{weights}"], "holds the input shards"),
        (["train-detector"], "needs --out"),
    ],
)
def test_cli_errors_are_one_line(shards, tmp_path, args, message):
    src, weights = shards
    argv = [a.format(tmp=tmp_path, src=src, weights=weights) for a in args]
    code, out, err = run_cli("featurize", *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_safe_decoder_never_unpickles():
    data = pickle.dumps({"x": 1})
    decoded = safe_decoder()(
        {"__key__": "k", "a.pyd": data, "b.pth": data, "c.pickle": data, "d.txt": b"hi"}
    )
    assert decoded["a.pyd"] == data and decoded["b.pth"] == data and decoded["c.pickle"] == data
    assert decoded["d.txt"] == "hi"


def test_image_bytes_decode_to_rgb():
    decoded = safe_decoder()({"__key__": "k", "jpg": jpeg(0, (40, 30))})
    assert decoded["jpg"].shape == (30, 40, 3) and decoded["jpg"].dtype == np.uint8
    assert Image.open(io.BytesIO(jpeg(0))).size == (256, 256)
