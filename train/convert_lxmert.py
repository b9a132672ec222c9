"""HF LXMERT checkpoints (`LxmertModel`, `LxmertForPreTraining`, `LxmertForQuestionAnswering`,
keys with or without the `lxmert.` prefix) → the `lxmert` recipe; train/convert_hf.py's `from_hf`
dispatches here for `model_type` "lxmert".

The backbone converts exactly (language, object-relationship and cross-modality layers, the
visual feature encoder, the pooler), and so do the pretraining heads we share: the LM head, the
matching head (`cls.seq_relationship`), and the visual head, whose one transform HF shares between
its decoders and we copy into both of ours. HF's object decoder predicts the 1600 Visual Genome
objects without background; ours keeps the detector's background column 0 (train/losses/mrc.py),
so a background row is prepended whose logit (bias -1e4) never wins — the softmax over the
objects is HF's. The attribute decoder and the QA head (its answer strings are not in the
checkpoint) are reported unused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlforge.train.convert_hf import BERT_LAYER, ConversionError

LXMERT_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                   "attention_probs_dropout_prob": 0.1}  # fmt: skip
# HF LXMERT hard-codes every LayerNorm's epsilon (its config has none).
LXMERT_EPS = 1e-12
BACKGROUND_BIAS = -1e4

TOP = {
    "embeddings.word_embeddings": "text.word",
    "embeddings.position_embeddings": "text.position",
    "embeddings.token_type_embeddings": "text.token_type",
    "embeddings.LayerNorm": "text.norm",
    "encoder.visn_fc.visn_fc": "regions.feat",
    "encoder.visn_fc.visn_layer_norm": "regions.feat_norm",
    "encoder.visn_fc.box_fc": "regions.box",
    "encoder.visn_fc.box_layer_norm": "regions.box_norm",
    "pooler.dense": "pooler.dense",
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
    "cls.seq_relationship": "itm.fc",
    "obj_predict_head.decoder_dict.feat": "mrfr.out",
}
# Shared by HF's visual decoders; ours each have their own transform.
VISUAL_TRANSFORM = {
    "obj_predict_head.transform.dense": ("mrc.dense", "mrfr.dense"),
    "obj_predict_head.transform.LayerNorm": ("mrc.norm", "mrfr.norm"),
}
# Within a cross-modality layer: HF name → ours (per stream for the self-attention and FFN).
X_LAYER = {
    "visual_attention.att.query": "cross.q",
    "visual_attention.att.key": "cross.k",
    "visual_attention.att.value": "cross.v",
    "visual_attention.output.dense": "cross.o",
    "visual_attention.output.LayerNorm": "cross_norm",
}
for _hf, _ours in (("lang", "lang"), ("visn", "vision")):
    X_LAYER |= {
        f"{_hf}_self_att.self.query": f"{_ours}.attn.q",
        f"{_hf}_self_att.self.key": f"{_ours}.attn.k",
        f"{_hf}_self_att.self.value": f"{_ours}.attn.v",
        f"{_hf}_self_att.output.dense": f"{_ours}.attn.o",
        f"{_hf}_self_att.output.LayerNorm": f"{_ours}.norm1",
        f"{_hf}_inter.dense": f"{_ours}.mlp.fc1",
        f"{_hf}_output.dense": f"{_ours}.mlp.fc2",
        f"{_hf}_output.LayerNorm": f"{_ours}.norm2",
    }
_STACK = re.compile(r"encoder\.(?P<stack>layer|r_layers|x_layers)\.(?P<i>\d+)\.(?P<sub>.+)")
_STACKS = {"layer": ("lang_layers", BERT_LAYER), "r_layers": ("r_layers", BERT_LAYER),
           "x_layers": ("x_layers", X_LAYER)}  # fmt: skip


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("lxmert."): v for k, v in state.items()}


def convert_lxmert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """HF LXMERT names → lxmert recipe names; returns (converted, unused HF keys)."""
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        k = key.removeprefix("lxmert.")
        stem, _, leaf = k.rpartition(".")
        if k == "cls.predictions.bias":
            out["mlm.decoder.bias"] = value
        elif k == "cls.predictions.decoder.weight" or k.endswith("position_ids"):
            continue  # tied to the word embeddings in both models; a buffer
        elif stem in TOP:
            out[f"{TOP[stem]}.{leaf}"] = value
        elif stem in VISUAL_TRANSFORM:
            for mine in VISUAL_TRANSFORM[stem]:
                out[f"{mine}.{leaf}"] = value.clone()
        elif stem == "obj_predict_head.decoder_dict.obj":
            fill = 0.0 if leaf == "weight" else BACKGROUND_BIAS
            out[f"mrc.decoder.{leaf}"] = torch.cat([torch.full_like(value[:1], fill), value])
        elif (m := _STACK.fullmatch(stem)) and m.group("sub") in _STACKS[m.group("stack")][1]:
            ours, names = _STACKS[m.group("stack")]
            out[f"{ours}.{m.group('i')}.{names[m.group('sub')]}.{leaf}"] = value
        else:
            unused.append(key)
    return out, unused


def _count(state: dict[str, torch.Tensor], stack: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"encoder\.{stack}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def lxmert_overrides(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """lxmert config fields for an HF LXMERT checkpoint (vocab_size included); shapes decide
    the widths and depths, the config the heads, activation and dropouts."""
    cfg = LXMERT_DEFAULTS | config
    s = _strip(state)
    try:
        word = s["embeddings.word_embeddings.weight"]
        visn = s["encoder.visn_fc.visn_fc.weight"]
        box = s["encoder.visn_fc.box_fc.weight"]
    except KeyError as e:
        raise ConversionError(f"not an LXMERT checkpoint: no {e.args[0]}") from None
    first = next(
        (f"encoder.{st}.0.{ffn}.weight" for st, ffn in (("layer", "intermediate.dense"),
         ("r_layers", "intermediate.dense"), ("x_layers", "lang_inter.dense"))
         if f"encoder.{st}.0.{ffn}.weight" in s),
        None,
    )  # fmt: skip
    if first is None:
        raise ConversionError("an LXMERT checkpoint without any encoder layer")
    out: dict[str, Any] = {
        "vocab_size": word.shape[0],
        "hidden": word.shape[1],
        "layers": _count(s, "layer"),
        "r_layers": _count(s, "r_layers"),
        "x_layers": _count(s, "x_layers"),
        "heads": int(cfg["num_attention_heads"]),
        "mlp": s[first].shape[0],
        "max_len": s["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab": s["embeddings.token_type_embeddings.weight"].shape[0],
        "act": str(cfg["hidden_act"]),
        "eps": LXMERT_EPS,
        "pad_id": 0,  # HF LXMERT's word embeddings pad at 0 whatever the config says
        "region_dim": visn.shape[1],
        "geometry": box.shape[1],
        "dropout": float(cfg["hidden_dropout_prob"]),
        "attn_dropout": float(cfg["attention_probs_dropout_prob"]),
    }
    obj = s.get("obj_predict_head.decoder_dict.obj.weight")
    if obj is not None:
        out["num_region_classes"] = obj.shape[0] + 1  # + the background column
    return out
