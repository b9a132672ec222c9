"""Numerical parity of the `visualbert` recipe with HF `VisualBertModel` / `VisualBertForPreTraining`
built from a small random config (nothing downloaded), saved with `save_pretrained` and converted
by path through train/convert_hf.py."""

from __future__ import annotations

import pytest
import torch
import transformers  # dev extra: a missing one must fail, not skip

from vlforge.train.convert_hf import ConversionError, detect_arch, from_hf, load_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = dict(atol=1e-5, rtol=0)
REGION_DIM = 12


def _config(**kw) -> transformers.VisualBertConfig:
    return transformers.VisualBertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=24, visual_embedding_dim=REGION_DIM, **kw,
    )  # fmt: skip


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    # HF inits LayerNorms to 1/0 and biases to 0: perturb every tensor so all are really compared.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(3, 9, dtype=torch.long)
    types[2, 5:] = 1  # a sentence pair: segment B on the text side too
    vmask = torch.ones(3, 5, dtype=torch.long)
    vmask[0, 3:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "visual_embeds": torch.randn(3, 5, REGION_DIM, generator=g),
        "visual_attention_mask": vmask,
    }


def _ours(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "token_type_ids": inputs["token_type_ids"],
        "region_feats": inputs["visual_embeds"],
        "region_mask": inputs["visual_attention_mask"],
    }


def test_visualbert_model_hidden_states_match_hf(tmp_path):
    hf = _perturbed(transformers.VisualBertModel(_config(hidden_act="gelu_new")))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, report = from_hf(tmp_path, size="small")
    ours.eval()
    assert report.arch == "visualbert"
    assert ours.cfg.act == "gelu_new" and ours.cfg.region_dim == REGION_DIM
    # A bare VisualBertModel has no MLM/ITM heads: only those stay at init.
    assert report.missing and all(k.startswith(("mlm.", "itm.")) for k in report.missing)
    assert not report.unused
    x = _inputs()
    with torch.no_grad():
        want = hf(**x)
        hidden, n_text = ours.encode(_ours(x))
        pooled = ours.pooled(_ours(x))
    assert n_text == 9
    torch.testing.assert_close(hidden, want.last_hidden_state, **TOL)
    torch.testing.assert_close(pooled, want.pooler_output, **TOL)


def test_visualbert_pretraining_heads_match_hf(tmp_path):
    hf = _perturbed(transformers.VisualBertForPreTraining(_config()))
    # The published uclanlp/visualbert-* checkpoints are pytorch_model.bin files (transformers 5
    # writes safetensors only), loaded with weights_only=True.
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    config, state = load_hf_checkpoint(tmp_path)
    assert detect_arch(config, state) == "visualbert"
    ours, report = from_hf(tmp_path / "pytorch_model.bin")
    ours.eval()
    assert not report.missing and not report.unused
    x = _inputs()
    # Segment ids on the image side too (HF's visual_token_type_ids): region 0 of row 1 as 0.
    vtypes = torch.ones(3, 5, dtype=torch.long)
    vtypes[1, 0] = 0
    with torch.no_grad():
        want = hf(**x, visual_token_type_ids=vtypes)
        batch = _ours(x) | {"visual_token_type_ids": vtypes}
        logits = ours.mlm_logits(batch)
        score = ours.itm_score(batch)
    torch.testing.assert_close(logits, want.prediction_logits[:, :9], **TOL)
    # HF's logit 0 means "matched": our score is its log-odds of a match.
    rel = want.seq_relationship_logits
    torch.testing.assert_close(score, rel[:, 0] - rel[:, 1], **TOL)
    # A converted model trains on: its losses are finite and backpropagate.
    ours.train()
    batch |= {"mlm_labels": x["input_ids"].masked_fill(x["attention_mask"] == 0, -100),
              "itm_labels": torch.tensor([1, 0, 1])}  # fmt: skip
    out = ours(batch)
    assert set(out) == {"loss", "mlm", "itm"} and torch.isfinite(out["loss"])


def test_bypass_transformer_is_refused(tmp_path):
    transformers.VisualBertModel(_config(bypass_transformer=True)).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="bypass_transformer"):
        from_hf(tmp_path)
