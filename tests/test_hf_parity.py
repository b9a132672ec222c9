"""Numerical parity with HF references built from small configs with random init (nothing is
downloaded): CLIP image/text embeddings and the single-stream encoder's text-only path vs BERT,
through train/convert_hf.py — from model objects, save_pretrained directories and lone
safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # dev extra: a missing one must fail, not skip

from vlforge.train.convert_hf import ConversionError, from_hf, main  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: OpenMP threads cost more than they give, and spin on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clip(eos_token_id: int):
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
            bos_token_id=0, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
            image_size=24, patch_size=8,
        ),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        # HF inits LayerNorms to 1/0 and Linear biases to 0: perturb every one of them, so a
        # dropped or misrouted bias or norm cannot match by accident.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _clip_inputs(eos: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    for row, length in enumerate((10, 7, 4)):  # the caption ends in eos, then padding
        ids[row, length - 1] = eos
        ids[row, length:] = 1
        mask[row, length:] = 0
    pixels = torch.randn(3, 3, 24, 24, generator=g)
    return ids, mask, pixels


def _pooled(out):
    # transformers ≥ 5 returns an output object from get_*_features, earlier versions a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("eos", [98, 2], ids=["eos-token", "legacy-argmax"])
def test_clip_embeddings_match_hf(eos):
    hf = _clip(eos)
    ours, report = from_hf(hf, size="small")
    ours.eval()
    assert not report.missing and not report.unused
    assert ours.cfg.text_pool == ("argmax" if eos == 2 else "eos")
    ids, mask, pixels = _clip_inputs(98 if eos == 98 else 95)
    if eos == 2:
        ids[ids == 95] = 98  # the highest id marks the end (OpenAI's convention)
    with torch.no_grad():
        want_t = _pooled(hf.get_text_features(input_ids=ids, attention_mask=mask))
        want_i = _pooled(hf.get_image_features(pixel_values=pixels))
        got_t = ours.encode_text({"input_ids": ids, "attention_mask": mask})
        got_i = ours.encode_image({"pixel_values": pixels})
    err_t, err_i = (got_t - want_t).abs().max().item(), (got_i - want_i).abs().max().item()
    print(f"clip parity max abs error: text {err_t:.2e}, image {err_i:.2e}")
    torch.testing.assert_close(got_t, want_t, **TOL)
    torch.testing.assert_close(got_i, want_i, **TOL)
    torch.testing.assert_close(ours.contrastive.logit_scale, hf.logit_scale.detach())


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=24, type_vocab_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _bert_inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 99, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(3, 12, dtype=torch.long)
    types[0, 6:] = 1
    return ids, mask, types


def _check_uniter_against_bert(ours, hf) -> float:
    ours.eval()
    ids, mask, types = _bert_inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    with torch.no_grad():
        want = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        want_mlm = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits
        hidden, _, n_text = ours.encode(batch)
        pooled = ours.pooler(hidden)
        logits = ours.mlm_logits(batch)
    assert n_text == 12
    real = mask.bool()  # padded positions are don't-care in both models
    err = (hidden[real] - want.last_hidden_state[real]).abs().max().item()
    torch.testing.assert_close(hidden[real], want.last_hidden_state[real], **TOL)
    torch.testing.assert_close(pooled, want.pooler_output, **TOL)
    torch.testing.assert_close(logits[real], want_mlm[real], atol=1e-4, rtol=0)
    return err


def test_uniter_text_path_matches_hf_bert():
    hf = _bert()
    ours, report = from_hf(hf, size="small", region_dim=16, num_region_classes=5)
    # Only UNITER's own parts stay at init; BERT's NSP head has no place in it.
    assert all(k.startswith(("regions.", "mrfr.", "mrc.", "itm.")) for k in report.missing)
    assert report.unused == ["cls.seq_relationship.weight", "cls.seq_relationship.bias"]
    err = _check_uniter_against_bert(ours, hf)
    print(f"bert→uniter parity max abs error: {err:.2e}")


def test_convert_from_saved_directory_and_safetensors_file(tmp_path):
    hf = _bert()
    hf.save_pretrained(tmp_path / "bert")
    ours, _ = from_hf(tmp_path / "bert", size="small")
    _check_uniter_against_bert(ours, hf)
    ours, _ = from_hf(tmp_path / "bert" / "model.safetensors", size="small")
    _check_uniter_against_bert(ours, hf)

    clip = _clip(98)
    clip.save_pretrained(tmp_path / "clip")
    ours, report = from_hf(tmp_path / "clip")
    assert not report.missing
    ids, mask, pixels = _clip_inputs(98)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval().encode_image({"pixel_values": pixels}),
            _pooled(clip.get_image_features(pixel_values=pixels)),
            **TOL,
        )


def test_convert_pytorch_bin_with_old_layernorm_names(tmp_path):
    # Old TF-converted BERT checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta.
    hf = _bert()
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in hf.state_dict().items()
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours, _ = from_hf(tmp_path, size="small")
    _check_uniter_against_bert(ours, hf)


def test_converter_cli_and_errors(tmp_path, capsys):
    hf = _clip(98)
    hf.save_pretrained(tmp_path / "clip")
    assert main([str(tmp_path / "clip"), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert meta["recipe"] == "clip" and meta["missing"] == []
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert "image.cls" in state
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "clip" / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match="config"):
        from_hf(lone)
    ours, _ = from_hf(lone, config=hf.config.to_dict())
    assert ours.name == "clip"
