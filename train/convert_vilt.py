"""HF ViLT checkpoints (`ViltModel`, `ViltForMaskedLM`, `ViltForImageAndTextRetrieval`, …) →
the `vilt` recipe: names, and config fields read off the tensors' shapes. Called by
train/convert_hf.py's `from_hf`, which loads the checkpoint (`load_hf_checkpoint`, by path).

The retrieval model's 1-logit `rank_output` becomes our 2-way ITM head with a zero "no match"
row, so `itm_score` (match − no-match logit) is its score unchanged. Task heads that have no
place here (VQA, NLVR2 classifiers) are reported unused.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

# HF defaults for the fields read from configs (configs written with use_diff omit them).
VILT_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                 "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                 "pad_token_id": None, "max_image_length": -1}  # fmt: skip

VILT_TOP = {
    "embeddings.text_embeddings.word_embeddings": "text.word",
    "embeddings.text_embeddings.position_embeddings": "text.position",
    "embeddings.text_embeddings.token_type_embeddings": "text.token_type",
    "embeddings.text_embeddings.LayerNorm": "text.norm",
    "embeddings.patch_embeddings.projection": "image.proj",
    "embeddings.token_type_embeddings": "modality",
    "layernorm": "norm",
    "pooler.dense": "pooler.dense",
    "mlm_score.transform.dense": "mlm.dense",
    "mlm_score.transform.LayerNorm": "mlm.norm",
}
VILT_LAYER = {
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.o",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
LAYER_RE = re.compile(r"encoder\.layer\.(?P<i>\d+)\.(?P<sub>.+)")


def _strip(key: str) -> str:
    return key.removeprefix("vilt.")


def convert_vilt_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """HF ViLT names → vilt recipe names; returns (converted, unused HF keys)."""
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        k = _strip(key)
        stem, _, leaf = k.rpartition(".")
        if k == "embeddings.cls_token":  # 1×1×H
            out["image.cls"] = value.reshape(-1)
        elif k == "embeddings.position_embeddings":  # 1×(1+patches)×H
            out["image.position.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif k in ("mlm_score.bias", "mlm_score.decoder.bias"):
            out["mlm.decoder.bias"] = value
        elif k == "mlm_score.decoder.weight":
            continue  # tied to the word embeddings in both models
        elif stem == "rank_output":
            zero = torch.zeros_like(value[:1])
            out[f"itm.fc.{leaf}"] = torch.cat([zero, value], 0)
        elif stem in VILT_TOP:
            out[f"{VILT_TOP[stem]}.{leaf}"] = value
        elif (m := LAYER_RE.fullmatch(stem)) and m.group("sub") in VILT_LAYER:
            out[f"encoder.layers.{m.group('i')}.{VILT_LAYER[m.group('sub')]}.{leaf}"] = value
        elif not k.endswith(("position_ids", "token_type_ids")):
            unused.append(key)
    return out, unused


def vilt_overrides(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """vilt config fields for an HF ViLT checkpoint (vocab_size included)."""
    cfg = VILT_DEFAULTS | config
    s = {_strip(k): v for k, v in state.items()}
    word = s["embeddings.text_embeddings.word_embeddings.weight"]
    patch = s["embeddings.patch_embeddings.projection.weight"]
    n_pos = s["embeddings.position_embeddings"].shape[-2]
    layers = {int(m.group("i")) for k in s if (m := LAYER_RE.match(k))}
    return {
        "vocab_size": word.shape[0],
        "hidden": word.shape[1],
        "layers": max(layers) + 1 if layers else 0,
        "heads": int(cfg["num_attention_heads"]),
        "mlp": s["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_len": s["embeddings.text_embeddings.position_embeddings.weight"].shape[0],
        "type_vocab": s["embeddings.text_embeddings.token_type_embeddings.weight"].shape[0],
        "modality_types": s["embeddings.token_type_embeddings.weight"].shape[0],
        "act": str(cfg["hidden_act"]),
        "eps": float(cfg["layer_norm_eps"]),
        "dropout": float(cfg["hidden_dropout_prob"]),
        "attn_dropout": float(cfg["attention_probs_dropout_prob"]),
        "pad_id": None if cfg["pad_token_id"] is None else int(cfg["pad_token_id"]),
        "image_size": math.isqrt(n_pos - 1) * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "max_image_length": int(cfg["max_image_length"] or -1),
    }
