"""LXMERT against HF `transformers.LxmertModel`: a random small checkpoint saved to disk, loaded
by path through `from_hf`, gives the same language, vision and pooled outputs (eval mode)."""

from __future__ import annotations

import pytest
import torch

from vlforge.train.convert_hf import detect_arch, from_hf, load_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REGION_DIM = 12


def _config(**kw):
    from transformers import LxmertConfig

    return LxmertConfig(
        vocab_size=60, hidden_size=32, num_attention_heads=4, intermediate_size=48,
        l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=REGION_DIM, visual_pos_dim=4,
        max_position_embeddings=40, num_object_labels=9, num_attr_labels=5, num_qa_labels=7,
        **kw,
    )  # fmt: skip


def perturb_biases_and_norms(model: torch.nn.Module) -> None:
    """Random LayerNorms and biases: HF initialises them to 1/0, and a swapped norm or a
    dropped bias would match at those values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)


def _inputs(b: int = 3, L: int = 8, R: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (b, L), generator=g)
    mask = torch.ones(b, L, dtype=torch.long)
    mask[0, -3:] = 0
    vmask = torch.ones(b, R, dtype=torch.long)
    vmask[1, -2:] = 0
    xy = torch.rand(b, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(b, R, 2, generator=g) * 0.5], -1)
    types = torch.zeros(b, L, dtype=torch.long)
    types[:, L // 2 :] = 1
    return {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": types,
        "visual_feats": torch.randn(b, R, REGION_DIM, generator=g), "visual_pos": boxes,
        "visual_attention_mask": vmask,
    }  # fmt: skip


def _ours(model, x: dict[str, torch.Tensor]):
    return model.encode_pair(
        x["input_ids"], x["token_type_ids"], x["attention_mask"], x["visual_feats"],
        x["visual_pos"], x["visual_attention_mask"],
    )  # fmt: skip


def test_lxmert_model_matches_hf(tmp_path):
    from transformers import LxmertModel

    torch.manual_seed(0)
    hf = LxmertModel(_config()).eval()
    perturb_biases_and_norms(hf)
    hf.save_pretrained(tmp_path)
    config, state = load_hf_checkpoint(tmp_path)
    assert detect_arch(config, state) == "lxmert"

    model, report = from_hf(tmp_path)
    model.eval()
    assert report.arch == "lxmert" and report.unused == []
    # Only the heads a bare LxmertModel has no weights for (and our mask embedding) stay at init.
    assert all(k.split(".")[0] in {"mlm", "mrc", "mrfr", "itm", "qa"} for k in report.missing
               if k != "regions.mask")  # fmt: skip
    assert report.overrides["layers"] == 2 and report.overrides["x_layers"] == 2

    x = _inputs()
    with torch.no_grad():
        ref = hf(**x)
        lang, vision, pooled = _ours(model, x)
    torch.testing.assert_close(lang, ref.language_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(vision, ref.vision_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref.pooled_output, atol=1e-5, rtol=0)


def test_lxmert_pretraining_heads_convert(tmp_path):
    """LxmertForPreTraining (the published checkpoints' class): the LM, matching and object
    heads come across; the object head keeps HF's distribution over the objects."""
    from transformers import LxmertForPreTraining

    torch.manual_seed(0)
    hf = LxmertForPreTraining(_config()).eval()
    perturb_biases_and_norms(hf)
    hf.save_pretrained(tmp_path)
    model, report = from_hf(tmp_path)
    model.eval()
    assert report.missing == ["regions.mask", "qa.fc1.weight", "qa.fc1.bias", "qa.norm.weight", "qa.norm.bias",
                              "qa.fc2.weight", "qa.fc2.bias"]  # fmt: skip
    assert all(k.startswith(("obj_predict_head.decoder_dict.attr", "answer_head."))
               for k in report.unused)  # fmt: skip
    assert model.cfg.num_region_classes == 10  # 9 objects + background

    x = _inputs()
    with torch.no_grad():
        ref = hf(**x)
        lang, vision, pooled = _ours(model, x)
        torch.testing.assert_close(model.mlm(lang), ref.prediction_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            model.itm(pooled), ref.cross_relationship_score, atol=1e-5, rtol=0
        )
        ours_obj = model.mrc(vision).softmax(-1)
        hf_obj = hf.obj_predict_head(vision)["obj"].softmax(-1)
        torch.testing.assert_close(ours_obj[..., 1:], hf_obj, atol=1e-5, rtol=0)
        assert float(ours_obj[..., 0].max()) < 1e-6
        feat = hf.obj_predict_head(vision)["feat"]
        torch.testing.assert_close(model.mrfr(vision), feat, atol=1e-5, rtol=0)
