"""ViLT parity with HF `transformers.ViltModel` (random small config, nothing downloaded): a
`save_pretrained` directory loaded by path through train/convert_hf.py gives the same
last_hidden_state, pooler_output, MLM logits and retrieval score in eval mode.

HF returns the image patches in a random order (it samples `max_image_length` of them, all with
-1, by torch.multinomial); ours are in raster order. The text part and the image [class] token
are compared in place, the patches after matching each HF patch to its nearest of ours — a
matching that must be a permutation.
"""

from __future__ import annotations

import pytest
import torch
import transformers  # dev extra: a missing one must fail, not skip

from vlforge.train.convert_hf import detect_arch, from_hf, load_hf_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = dict(atol=1e-5, rtol=0)
L = 10  # caption length in the test batch


def _config() -> transformers.ViltConfig:
    return transformers.ViltConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16, image_size=32, patch_size=8,
        max_image_length=-1, hidden_act="gelu", layer_norm_eps=1e-12,
    )  # fmt: skip


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # HF inits LayerNorms to 1/0, biases, the [class] token and positions to 0: perturb them so
    # every converted tensor really takes part in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().max() == 0 or "LayerNorm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = _perturbed(transformers.ViltForMaskedLM(_config()))
    path = tmp_path_factory.mktemp("vilt_mlm")
    hf.save_pretrained(path)
    return hf, path


def _inputs(size: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, 7:] = 0  # padded captions
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    pixels = torch.randn(3, 3, size, size, generator=g)
    return ids, mask, pixels


def _match_patches(want: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Our patches reordered as HF's (B×P×H each), by nearest neighbour per row."""
    order = torch.cdist(want, got, compute_mode="donot_use_mm_for_euclid_dist").argmin(-1)
    for row in order:
        assert sorted(row.tolist()) == list(range(got.shape[1])), "not a permutation"
    return got.gather(1, order[..., None].expand_as(got))


@pytest.mark.parametrize("size", [32, 48], ids=["config-size", "interpolated-positions"])
def test_vilt_matches_hf_by_path(mlm_dir, size):
    hf, path = mlm_dir
    config, state = load_hf_checkpoint(path)
    assert detect_arch(config, state) == "vilt"
    ours, report = from_hf(path, size="small")
    ours.eval()
    assert report.arch == "vilt" and not report.unused
    assert set(report.missing) == {"itm.fc.weight", "itm.fc.bias"}  # no ITM head in this model
    assert ours.cfg.image_size == 32 and ours.cfg.patch_size == 8 and ours.cfg.max_len == 16

    ids, mask, pixels = _inputs(size)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with torch.no_grad():
        want = hf.vilt(
            input_ids=ids, attention_mask=mask, pixel_values=pixels,
            pixel_mask=torch.ones(3, size, size, dtype=torch.long),
        )  # fmt: skip
        want_mlm = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        hidden, _, n_text = ours.encode(batch)
        got_mlm = ours.mlm_logits(batch)
    patches = (size // 8) ** 2
    assert hidden.shape == want.last_hidden_state.shape == (3, L + 1 + patches, 32)
    # text and the image [class] token in place, the patches up to HF's shuffle
    head = L + 1
    torch.testing.assert_close(hidden[:, :head], want.last_hidden_state[:, :head], **TOL)
    want_patches = want.last_hidden_state[:, head:]
    torch.testing.assert_close(_match_patches(want_patches, hidden[:, head:]), want_patches, **TOL)
    torch.testing.assert_close(ours.pooler(hidden), want.pooler_output, **TOL)
    torch.testing.assert_close(got_mlm, want_mlm, **TOL)
    assert n_text == L


def test_vilt_retrieval_head_becomes_itm_score(tmp_path):
    torch.manual_seed(2)
    hf = _perturbed(transformers.ViltForImageAndTextRetrieval(_config()))
    hf.save_pretrained(tmp_path)
    ours, report = from_hf(tmp_path, size="small")
    ours.eval()
    assert not report.unused
    assert all(k.startswith("mlm.") for k in report.missing)  # no MLM head in this model
    ids, mask, pixels = _inputs(32)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, 0]
        got = ours.itm_score({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    torch.testing.assert_close(got, want, **TOL)
