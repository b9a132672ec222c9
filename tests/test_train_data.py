"""Streaming loader: shard URL forms, safe decoding, determinism, rank/worker splits, resume, batches.

`make_shards` writes small shards shaped like the corpus + featurize + mine stages' output; the
masking, trainer and evaluation tests use it too.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlforge.errors import UserError
from vlforge.train.collate import Assembler, BatchSpec, region_geometry
from vlforge.train.data import Loader, SlotStream, StreamConfig, expand_shards, iter_shard
from vlforge.train.decode import decode_sample
from vlforge.train.masking import MaskingConfig
from vlforge.train.tokenizer import train_wordpiece

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["left of", "right of", "above", "below"]
FEAT_DIM, N_CLASSES = 16, 5


def caption_of(rng: np.random.Generator) -> tuple[str, str, str]:
    c, s = COLOURS[rng.integers(4)], SHAPES[rng.integers(3)]
    other = f"{COLOURS[rng.integers(4)]} {SHAPES[rng.integers(3)]}"
    return f"a {c} {s} {RELATIONS[rng.integers(4)]} a {other}", c, s


def scene_graph_of(caption: str) -> dict:
    """sg.json of a caption_of() caption, in the parser's format (token spans, end exclusive)."""
    tokens = caption.split()
    rel_end = len(tokens) - 3
    return {
        "tokens": tokens,
        "objects": [
            {"id": 0, "name": tokens[2], "count": 1, "span": [2, 3]},
            {"id": 1, "name": tokens[-1], "count": 1, "span": [len(tokens) - 1, len(tokens)]},
        ],
        "attributes": [
            {"object": 0, "name": tokens[1], "span": [1, 2]},
            {"object": 1, "name": tokens[-2], "span": [len(tokens) - 2, len(tokens) - 1]},
        ],
        "relations": [
            {"subject": 0, "name": " ".join(tokens[3:rel_end]), "object": 1, "span": [3, rel_end]}
        ],
    }


def render(colour: str, shape: str, size: int = 32) -> bytes:
    """A tiny image whose colour and shape the caption names (so a model can learn the pairing)."""
    rgb = {
        "red": (220, 30, 30),
        "green": (30, 200, 30),
        "blue": (30, 30, 220),
        "yellow": (230, 230, 20),
    }
    arr = np.full((size, size, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    inside = {
        "circle": (yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2,
        "square": (abs(yy - c) < size // 3) & (abs(xx - c) < size // 3),
        "triangle": (yy > size // 5) & (abs(xx - c) < (yy - size // 5) // 2 + 1),
    }[shape]
    arr[inside] = rgb[colour]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(
    root: Path, n_shards: int = 3, per_shard: int = 20, seed: int = 0, size: int = 32
) -> str:
    """Shards {root}/train-00000{0..n-1}.tar with jpg/txt/json and regions + mine fields; returns
    the brace pattern."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as w:
            for i in range(per_shard):
                caption, colour, shape = caption_of(rng)
                n = int(rng.integers(3, 8))
                xy = rng.uniform(0, size * 0.6, size=(n, 2))
                wh = rng.uniform(4, size * 0.4, size=(n, 2))
                boxes = np.concatenate([xy, np.minimum(xy + wh, size)], axis=1).astype(np.float32)
                # Region features carry the colour/shape identity plus noise.
                feats = rng.normal(size=(n, FEAT_DIM)).astype(np.float32) * 0.1
                feats[:, COLOURS.index(colour)] += 1.0
                feats[:, 4 + SHAPES.index(shape)] += 1.0
                logits = rng.normal(size=(n, N_CLASSES))
                prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
                other, _, _ = caption_of(rng)
                top = [{"name": "large", "score": 0.6}, {"name": colour, "score": 0.9}]
                w.write(
                    {
                        "__key__": f"k{s:02d}{i:04d}",
                        "jpg": render(colour, shape, size),
                        "txt": caption,
                        "json": {"width": size, "height": size, "colour": colour, "shape": shape},
                        "boxes.npy": boxes,
                        "feats.npy": feats.astype(np.float16),
                        "cls_prob.npy": prob.astype(np.float16),
                        "tags.json": {
                            "tags": [
                                {"name": shape, "score": 0.99, "count": 1, "attributes": top},
                                {"name": SHAPES[(SHAPES.index(shape) + 1) % 3], "score": 0.7},
                            ]
                        },
                        "sg.json": scene_graph_of(caption),
                        "mine.json": {
                            "hard_negatives": [{"caption": other, "key": "x", "score": 0.5}],
                            "rewrites": [],
                            "positives": [],
                        },
                    }
                )
    return str(root / f"train-{{000000..{n_shards - 1:06d}}}.tar")


def all_keys(pattern: str) -> list[str]:
    return [s["__key__"] for url in expand_shards(pattern) for s in iter_shard(url)]


def keys_assembler(samples, rng, shared):
    return {"keys": [s["__key__"] for s in samples]}


def slot_keys(cfg: StreamConfig, slot: int, slots: int, limit: int | None = None) -> list[str]:
    out = []
    for raw, _ in SlotStream(cfg, slot, slots).iterate():
        out.append(raw["__key__"])
        if limit is not None and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------------


def test_url_forms(tmp_path):
    pattern = make_shards(tmp_path, n_shards=2, per_shard=3)
    urls = expand_shards(pattern)
    assert [Path(u).name for u in urls] == ["train-000000.tar", "train-000001.tar"]
    assert expand_shards(str(tmp_path)) == urls  # a directory
    assert expand_shards(str(tmp_path / "train-{000001,000000}.tar")) == urls[::-1]
    assert expand_shards(f"{urls[0]}::{urls[1]}") == urls
    assert expand_shards(str(tmp_path / "train-*.tar")) == urls  # a glob
    expected = all_keys(pattern)
    assert len(expected) == 6
    piped = [s["__key__"] for u in urls for s in iter_shard(f"pipe:cat {u}")]
    assert piped == expected
    pipes = expand_shards(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar")
    assert pipes == [f"pipe:cat {u}" for u in urls]
    fileurl = [s["__key__"] for u in urls for s in iter_shard("file://" + u)]
    assert fileurl == expected
    import fsspec

    fs = fsspec.filesystem("memory")
    for u in urls:
        fs.pipe("/shards/" + Path(u).name, Path(u).read_bytes())
    mem = expand_shards("memory://shards/train-{000000..000001}.tar")
    assert [s["__key__"] for u in mem for s in iter_shard(u)] == expected
    with pytest.raises(UserError):
        expand_shards(str(tmp_path / "nope-{0..1}.tar"))


def test_decoders_never_unpickle(tmp_path):
    payload = pickle.dumps({"x": 1})
    path = tmp_path / "evil.tar"
    with wds.TarWriter(str(path)) as w:
        obj = np.array([{"a": 1}], dtype=object)
        buf = io.BytesIO()
        np.save(buf, obj, allow_pickle=True)
        w.write(
            {"__key__": "a", "pkl": payload, "pth": payload, "txt": "hi", "obj.npy": buf.getvalue()}
        )
    raw = next(iter_shard(str(path)))
    out = decode_sample({k: v for k, v in raw.items() if k != "obj.npy"})
    assert out == {"__key__": "a", "txt": "hi"}  # .pkl and .pth dropped, never parsed
    with pytest.raises(ValueError, match="pickle"):
        decode_sample(raw)  # an object array is refused, not unpickled


@pytest.mark.parametrize("order", ["epochs", "resampled"])
def test_stream_is_deterministic(tmp_path, order):
    cfg = StreamConfig(
        tuple(expand_shards(make_shards(tmp_path))), seed=3, order=order, shuffle_buffer=8
    )
    a = slot_keys(cfg, 1, 2, limit=50)
    assert a == slot_keys(cfg, 1, 2, limit=50)
    other = StreamConfig(cfg.urls, seed=4, order=order, shuffle_buffer=8)
    assert a != slot_keys(other, 1, 2, limit=50)


@pytest.mark.parametrize("n_shards,slots", [(4, 4), (3, 2), (2, 6), (1, 3), (5, 4)])
def test_one_pass_splits_without_overlap_or_loss(tmp_path, n_shards, slots):
    pattern = make_shards(tmp_path, n_shards=n_shards, per_shard=7)
    cfg = StreamConfig(tuple(expand_shards(pattern)), seed=1, order="once", shuffle_buffer=5)
    parts = [slot_keys(cfg, s, slots) for s in range(slots)]
    flat = [k for p in parts for k in p]
    assert Counter(flat) == Counter(all_keys(pattern))  # every sample once: no overlap, no loss


@pytest.mark.parametrize("n_shards,slots", [(3, 2), (2, 3), (4, 4)])
def test_epochs_cover_every_sample_once_per_pass(tmp_path, n_shards, slots):
    pattern = make_shards(tmp_path, n_shards=n_shards, per_shard=5)
    cfg = StreamConfig(tuple(expand_shards(pattern)), seed=2, order="epochs", units_per_chunk=1)
    keys = all_keys(pattern)
    n_units = SlotStream(cfg, 0, slots).n_units

    def passes(p):
        # Pass p is global unit positions j in [0, p * n_units); slot s holds j = s + slots * k,
        # and with one unit per chunk, chunk k is unit k.
        out = []
        for s in range(slots):
            chunks = len(range(s, p * n_units, slots))
            for raw, (chunk, _) in SlotStream(cfg, s, slots).iterate():
                if chunk >= chunks:
                    break
                out.append(raw["__key__"])
        return Counter(out)

    assert passes(1) == Counter(keys)
    assert passes(2) == Counter({k: 2 for k in keys})


def test_loader_ranks_and_workers_cover_the_data(tmp_path):
    pattern = make_shards(tmp_path, n_shards=4, per_shard=6)
    cfg = StreamConfig(tuple(expand_shards(pattern)), seed=0, order="once", shuffle_buffer=4)
    seen = []
    for rank in range(2):
        loader = Loader(
            cfg, keys_assembler, 4, num_workers=2, rank=rank, world_size=2, drop_last=False
        )
        seen += [k for b in loader for k in b["keys"]]
    assert Counter(seen) == Counter(all_keys(pattern))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly(tmp_path, workers):
    pattern = make_shards(tmp_path, n_shards=3, per_shard=9)
    cfg = StreamConfig(tuple(expand_shards(pattern)), seed=5, shuffle_buffer=6, units_per_chunk=2)

    def take(loader, n):
        it = iter(loader)
        return [next(it)["keys"] for _ in range(n)]

    whole = take(Loader(cfg, keys_assembler, 4, num_workers=workers), 17)
    first = Loader(cfg, keys_assembler, 4, num_workers=workers)
    head = take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint as JSON
    tail = take(Loader(cfg, keys_assembler, 4, num_workers=workers, state=state), 10)
    assert head + tail == whole


def test_required_fields_and_corrupt_samples_are_skipped(tmp_path):
    path = tmp_path / "mixed.tar"
    good = render("red", "circle")
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "a", "jpg": good, "txt": "a", "json": {}})
        w.write({"__key__": "b", "txt": "no image", "json": {}})
        w.write({"__key__": "c", "jpg": b"not a jpeg", "txt": "c", "json": {}})
        w.write({"__key__": "d", "jpg": good, "txt": "d", "json": {}})
    cfg = StreamConfig((str(path),), order="once", shuffle_buffer=1)
    loader = Loader(
        cfg, keys_assembler, 8, fields=("jpg", "txt"), required=("jpg", "txt"), drop_last=False
    )
    with pytest.warns(UserWarning):
        keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == ["a", "d"]  # stream order may put d first


def test_empty_shards_end_the_stream(tmp_path):
    path = tmp_path / "empty.tar"
    with wds.TarWriter(str(path)):
        pass
    cfg = StreamConfig((str(path),) * 3, order="resampled")
    assert slot_keys(cfg, 0, 2) == []  # an epoch-free stream over no data ends, not spins


# ---------------------------------------------------------------------------------------------
# Batch assembly


def _samples(tmp_path, n=24):
    cfg = StreamConfig(tuple(expand_shards(make_shards(tmp_path, 2, n // 2))), order="once")
    return [decode_sample(raw) for raw, _ in SlotStream(cfg, 0, 1).iterate()]


def test_batch_contract(tmp_path):
    samples = _samples(tmp_path)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    spec = BatchSpec(
        inputs=frozenset({"text", "regions", "pixels"}),
        tasks={"mlm": 1, "mrc_kl": 1, "itm": 1},
        geometry=7,
        image_size=24,
    )
    b = Assembler(spec, tok)(samples[:6], np.random.default_rng(0))
    n, seq = b["input_ids"].shape
    assert n == 6 and b["input_ids"][:, 0].eq(tok.cls_id).all()
    for k in ("attention_mask", "token_type_ids", "mlm_labels"):
        assert b[k].shape == (n, seq) and b[k].dtype == torch.long
    r = b["region_feats"].shape[1]
    assert b["region_feats"].shape == (n, r, FEAT_DIM) and b["region_feats"].dtype == torch.float32
    assert (
        b["region_boxes"].shape == (n, r, 4)
        and 0 <= b["region_boxes"].min() <= b["region_boxes"].max() <= 1
    )
    assert b["region_geom"].shape == (n, r, 7)
    assert b["region_cls_prob"].shape == (n, r, N_CLASSES)
    assert b["mrm_mask"].dtype == torch.bool and b["region_mask"].shape == (n, r)
    assert b["pixel_values"].shape == (n, 3, 24, 24)
    assert b["itm_labels"].shape == (n,) and "task" not in b
    assert len(b["keys"]) == n
    # Masked rows only on matched pairs; masked regions zeroed or kept, target keeps originals.
    neg = b["itm_labels"] == 0
    assert (b["mlm_labels"][neg] == -100).all() and not b["mrm_mask"][neg].any()
    pad = b["region_mask"] == 0
    assert not b["mrm_mask"][pad].any()


def test_masking_does_not_reveal_the_itm_label(tmp_path):
    # With MLM and ITM on one batch (task_mode "sum"), masking only matched rows would let ITM
    # read the label off the [MASK] tokens; inputs are masked alike, only the losses differ.
    samples = _samples(tmp_path, 16)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    spec = BatchSpec(tasks={"mlm": 1, "mrfr": 1, "itm": 1}, geometry=7)
    asm = Assembler(spec, tok)
    masked = {0: [], 1: []}
    for i in range(40):
        b = asm(samples, np.random.default_rng(i))
        has_mask = (b["input_ids"] == tok.mask_id).any(dim=1)
        for label, flag in zip(b["itm_labels"].tolist(), has_mask.tolist(), strict=True):
            masked[label].append(flag)
        neg = b["itm_labels"] == 0
        assert (b["mlm_labels"][neg] == -100).all() and not b["mrm_mask"][neg].any()
    rate = {label: np.mean(flags) for label, flags in masked.items()}
    assert rate[0] > 0.5 and abs(rate[0] - rate[1]) < 0.15, rate


def test_geometry_encodings():
    boxes = np.array([[0.1, 0.2, 0.5, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(region_geometry(boxes, 4), [[0.1, 0.2, 0.5, 0.6]])
    np.testing.assert_allclose(region_geometry(boxes, 5), [[0.1, 0.2, 0.5, 0.6, 0.16]], rtol=1e-6)
    np.testing.assert_allclose(
        region_geometry(boxes, 7), [[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]], rtol=1e-6
    )


def test_sampled_tasks_follow_their_probabilities(tmp_path):
    samples = _samples(tmp_path, 8)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    spec = BatchSpec(tasks={"mlm": 2.0, "mrfr": 1.0, "itm": 1.0}, task_mode="sample", geometry=7)
    asm = Assembler(spec, tok)
    counts = Counter()
    for i in range(2000):
        task, text, regions, pairs = asm.plan(np.random.default_rng(i))
        counts[task] += 1
        assert (text, regions, pairs) == (task == "mlm", task == "mrfr", task == "itm")
    assert abs(counts["mlm"] / 2000 - 0.5) < 0.04 and abs(counts["itm"] / 2000 - 0.25) < 0.04
    b = asm(samples, np.random.default_rng(1))
    assert b["task"] in spec.tasks


@pytest.mark.parametrize("paired", [False, True])
def test_itm_negatives_ratio_and_hard_negatives(tmp_path, paired):
    samples = _samples(tmp_path, 24)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    m = MaskingConfig(itm_neg_ratio=0.3, hard_neg_ratio=1.0, itm_paired=paired)
    asm = Assembler(BatchSpec(tasks={"itm": 1}, masking=m), tok)
    negs, hard, total = 0, 0, 0
    hard_caps = {s["mine.json"]["hard_negatives"][0]["caption"] for s in samples}
    for i in range(200):
        captions, visual, labels = asm.pairs(samples, np.random.default_rng(i))
        negs += int((labels == 0).sum())
        hard += sum(
            c in hard_caps and c != s["txt"] for c, s in zip(captions, samples, strict=True)
        )
        total += len(labels)
        assert all(
            c != s["txt"] for c, s, lab in zip(captions, samples, labels, strict=True) if lab == 0
        )
    assert abs(negs / total - 0.3) < 0.02
    assert hard >= 0.95 * negs  # hard_neg_ratio=1: negatives come from mine.json
    m = MaskingConfig(itm_neg_ratio=0.5, hard_neg_ratio=0.0, itm_image_swap=0.5, itm_paired=paired)
    asm = Assembler(BatchSpec(tasks={"itm": 1}, masking=m), tok)
    swaps = 0
    for i in range(200):
        captions, visual, labels = asm.pairs(samples, np.random.default_rng(i))
        swaps += sum(v != j for j, v in enumerate(visual))
        for j, lab in enumerate(labels):
            matched = captions[j] == samples[visual[j]]["txt"]
            assert matched == bool(lab)
    assert 0.2 < swaps / (200 * len(samples)) < 0.3  # half of the 50% negatives swap the image


def test_paired_itm_negatives_share_a_modality_with_a_matched_row(tmp_path):
    samples = _samples(tmp_path, 24)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    for swap, hard_ratio in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        m = MaskingConfig(itm_neg_ratio=0.5, itm_image_swap=swap, hard_neg_ratio=hard_ratio,
                          itm_paired=True)  # fmt: skip
        asm = Assembler(BatchSpec(tasks={"itm": 1}, masking=m), tok)
        negs = total = 0
        for i in range(100):
            captions, visual, labels = asm.pairs(samples, np.random.default_rng(i))
            matched = [j for j, lab in enumerate(labels) if lab == 1]
            assert all(visual[j] == j and captions[j] == samples[j]["txt"] for j in matched)
            for j in np.flatnonzero(labels == 0):
                assert captions[j] != samples[visual[j]]["txt"]
                if hard_ratio == 1.0:  # the row's own image under one of its mined captions
                    assert visual[j] == j
                    hard = {h["caption"] for h in samples[j]["mine.json"]["hard_negatives"]}
                    assert captions[j] in hard
                elif swap == 1.0:  # the row's own caption over a matched row's image
                    assert captions[j] == samples[j]["txt"] and visual[j] in matched
                else:  # the row's own image under a matched row's caption
                    assert visual[j] == j and captions[j] in {captions[a] for a in matched}
            negs += int((labels == 0).sum())
            total += len(labels)
        assert abs(negs / total - 0.5) < 0.05


def test_env_does_not_leak(tmp_path):
    # The tokenizer module turns the Rust thread pool off for forked workers.
    import vlforge.train.tokenizer  # noqa: F401

    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def _hook_adds_caption_lengths(batch, ctx):
    # module-level, so it pickles into loader workers like a recipe's own hook
    batch["caption_chars"] = torch.tensor([len(c) for c in ctx.captions])
    batch["saw_tags"] = [("tags.json" in s) for s in ctx.visual_samples]


def test_batch_hook_sees_rows_and_adds_keys():
    from vlforge.train.collate import Assembler, BatchSpec

    samples = [
        {"__key__": f"k{i}", "txt": f"a red circle number {i}", "tags.json": {"tags": []}}
        for i in range(4)
    ]
    tok = train_wordpiece([s["txt"] for s in samples], 64)
    spec = BatchSpec(
        inputs=frozenset({"text"}),
        tasks={"mlm": 1.0},
        hook=_hook_adds_caption_lengths,
        extra_fields=("tags.json",),
    )
    assert "tags.json" in spec.fields()[0] and "tags.json" not in spec.fields()[1]
    batch = Assembler(spec, tok)(samples, np.random.default_rng(0))
    assert batch["caption_chars"].tolist() == [len(s["txt"]) for s in samples]
    assert batch["saw_tags"] == [True] * 4


def test_required_fields_follow_the_inputs():
    from vlforge.train.collate import BatchSpec

    decode, required = BatchSpec(inputs=frozenset({"pixels"}), tasks={"recon": 1.0}).fields()
    assert required == ("jpg",) and "txt" in decode  # captions read when present, not needed
    decode, required = BatchSpec(inputs=frozenset({"text", "regions"})).fields()
    assert {"txt", "boxes.npy", "feats.npy", "cls_prob.npy"} <= set(required)
    assert "jpg" not in decode
