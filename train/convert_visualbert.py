"""HF VisualBERT checkpoints (`VisualBertModel`, `VisualBertForPreTraining`, e.g. the published
uclanlp/visualbert-* directories) → the `visualbert` recipe; called by train/convert_hf.py.

Names map one to one (embeddings, BERT layers, pooler, MLM head). HF's sentence-image head puts
"matched" in logit 0 (`sentence_image_labels`: 0 = the caption belongs to the image) and ours in
logit 1 (`itm_labels`: 1 = matched), so its two rows are swapped. The `bypass_transformer`
variant (regions skip the transformer but for one extra layer) is not this recipe and is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from vlforge.train.convert_hf import (
    BERT_DEFAULTS,
    ConversionError,
    _count_layers,
    convert_bert_like,
)

VISUALBERT_TOP = {
    "embeddings.word_embeddings": "embed.text.word",
    "embeddings.position_embeddings": "embed.text.position",
    "embeddings.token_type_embeddings": "embed.text.token_type",
    "embeddings.LayerNorm": "embed.norm",
    "embeddings.visual_projection": "embed.visual",
    "embeddings.visual_token_type_embeddings": "embed.visual_type",
    "embeddings.visual_position_embeddings": "embed.visual_position",
    "pooler.dense": "pooler.dense",
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
    "cls.seq_relationship": "itm.fc",
}


def convert_visualbert_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF VisualBERT names → visualbert recipe names; returns (converted, unused HF keys)."""
    out, unused = convert_bert_like(state, "visual_bert.", VISUALBERT_TOP)
    for name in ("itm.fc.weight", "itm.fc.bias"):
        if name in out:
            out[name] = out[name].flip(0)  # HF: logit 0 = matched; ours: logit 1
    return out, unused


def visualbert_overrides(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """visualbert config fields for an HF VisualBERT checkpoint (vocab_size included)."""
    cfg = BERT_DEFAULTS | config
    if cfg.get("bypass_transformer"):
        raise ConversionError("VisualBERT with bypass_transformer=True is not supported")
    s = {k.removeprefix("visual_bert."): v for k, v in state.items()}
    try:
        word = s["embeddings.word_embeddings.weight"]
        visual = s["embeddings.visual_projection.weight"]
        return {
            "vocab_size": word.shape[0],
            "hidden": word.shape[1],
            "layers": _count_layers(s, r"^encoder\.layer\.(\d+)\."),
            "heads": int(cfg["num_attention_heads"]),
            "mlp": s["encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_len": s["embeddings.position_embeddings.weight"].shape[0],
            "type_vocab": s["embeddings.token_type_embeddings.weight"].shape[0],
            "region_dim": visual.shape[1],
            "act": str(cfg["hidden_act"]),
            "eps": float(cfg["layer_norm_eps"]),
            "pad_id": int(cfg["pad_token_id"] if cfg["pad_token_id"] is not None else 0),
            "dropout": float(cfg.get("hidden_dropout_prob", 0.1)),
            "attn_dropout": float(cfg.get("attention_probs_dropout_prob", 0.1)),
        }
    except KeyError as exn:
        raise ConversionError(f"VisualBERT checkpoint lacks {exn.args[0]}") from None
