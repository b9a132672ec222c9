"""Load Hugging Face checkpoints into our recipes: CLIP (`CLIPModel`) → `clip`, BERT
(`BertModel` / `BertForPreTraining` / `BertForMaskedLM`) → the text path of `uniter` (UNITER is
initialized from BERT; its region embeddings and region heads stay freshly initialized),
ViLT (`ViltModel`, `ViltForMaskedLM`, …) → `vilt` (names and shapes in train/convert_vilt.py).
LXMERT (`LxmertModel`, `LxmertForPreTraining`) → `lxmert` (train/convert_lxmert.py).
VisualBERT (`VisualBertModel`, `VisualBertForPreTraining`) → `visualbert` (train/convert_visualbert.py).

Sources: an HF model object, a `save_pretrained` directory (config.json + model.safetensors,
sharded safetensors or pytorch_model.bin), or one weights file (.safetensors / .bin, with a
config.json beside it or a `config` dict). transformers itself is not needed. Widths, depths,
vocabulary and image sizes are read off the tensors' shapes — the weights are the truth; head
counts, activations and epsilons come from the config (HF's defaults where it is silent).
`.bin` files load with `torch.load(weights_only=True)`: never unpickle a checkpoint.

    python -m vlforge.train.convert_hf SRC OUT_DIR   # OUT_DIR/model.pt + recipe.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlforge.train.recipes.base import Recipe
from vlforge.train.recipes.registry import build_recipe

# HF defaults for the fields we read from configs (configs written with use_diff omit them).
BERT_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                 "pad_token_id": 0}  # fmt: skip
CLIP_TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                      "eos_token_id": 2}  # fmt: skip
CLIP_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5}  # fmt: skip

# Per-layer names: HF suffix → ours.
BERT_LAYER = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
BERT_TOP = {
    "embeddings.word_embeddings": "text.word",
    "embeddings.position_embeddings": "text.position",
    "embeddings.token_type_embeddings": "text.token_type",
    "embeddings.LayerNorm": "text.norm",
    "pooler.dense": "pooler.dense",
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
}
CLIP_LAYER = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.o",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
CLIP_TOP = {
    "text_model.embeddings.token_embedding": "text.embed.word",
    "text_model.embeddings.position_embedding": "text.embed.position",
    "text_model.final_layer_norm": "text.norm",
    "text_projection": "text.proj",
    "vision_model.embeddings.patch_embedding": "image.patch",
    "vision_model.embeddings.position_embedding": "image.position",
    "vision_model.pre_layrnorm": "image.norm_pre",
    "vision_model.post_layernorm": "image.norm_post",
    "visual_projection": "image.proj",
}
CLIP_PARAMS = {
    "vision_model.embeddings.class_embedding": "image.cls",
    "logit_scale": "contrastive.logit_scale",
}


class ConversionError(ValueError):
    """A checkpoint this converter cannot read (wrong architecture, missing config, …)."""


@dataclass
class ConversionReport:
    arch: str
    overrides: dict[str, Any]
    missing: list[str] = field(default_factory=list)  # our parameters the checkpoint lacks
    unused: list[str] = field(default_factory=list)  # checkpoint tensors we have no place for


# -- reading checkpoints -----------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.name.endswith(".safetensors.index.json"):
        files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out |= _read_weights(path.parent / f)
        return out
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds no state dict")
    return state


def load_hf_checkpoint(
    path: str | Path, config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a `save_pretrained` directory or a single weights file."""
    p = Path(path)
    if p.is_dir():
        names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")  # fmt: skip
        weights = next((p / n for n in names if (p / n).exists()), None)
        if weights is None:
            raise ConversionError(f"{p} has none of {', '.join(names)}")
        if weights.name == "pytorch_model.bin.index.json":
            files = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state |= _read_weights(p / f)
        else:
            state = _read_weights(weights)
        cfg_file = p / "config.json"
    elif p.is_file():
        state = _read_weights(p)
        cfg_file = p.parent / "config.json"
    else:
        raise ConversionError(f"no checkpoint at {p}")
    if config is None:
        if not cfg_file.exists():
            raise ConversionError(f"{p}: no config.json beside the weights; pass config=")
        config = json.loads(cfg_file.read_text())
    return config, state


def detect_arch(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    kind = str(config.get("model_type", ""))
    if kind == "lxmert" or any("x_layers.0.visual_attention." in k for k in state):
        return "lxmert"
    if kind == "vilt" or any("embeddings.text_embeddings.word_embeddings" in k for k in state):
        return "vilt"
    if kind == "clip" or any(k.startswith("vision_model.") for k in state):
        return "clip"
    # Before BERT: VisualBERT's encoder has BERT's layer names too.
    if kind == "visual_bert" or any("embeddings.visual_projection" in k for k in state):
        return "visualbert"
    if kind == "bert" or any("encoder.layer.0.attention.self.query" in k for k in state):
        return "bert"
    raise ConversionError(
        f"not a BERT, CLIP, VisualBERT, LXMERT or ViLT checkpoint (model_type {kind!r})"
    )


# -- renaming ----------------------------------------------------------------------------------


def _rename(
    key: str, top: dict[str, str], layer: dict[str, str], layer_re: re.Pattern, ours: dict
) -> str | None:
    for hf, mine in ours.items():
        if key == hf:
            return mine
    stem, _, leaf = key.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{leaf}"
    m = layer_re.fullmatch(stem)
    if m and m.group("sub") in layer:
        return f"{m.group('prefix')}.layers.{m.group('i')}.{layer[m.group('sub')]}.{leaf}"
    return None


BERT_LAYER_RE = re.compile(r"(?P<prefix>encoder)\.layer\.(?P<i>\d+)\.(?P<sub>.+)")


def convert_bert_like(
    state: dict[str, torch.Tensor], prefix: str, top: dict[str, str]
) -> tuple[dict, list[str]]:
    """HF BERT-family names (BERT's layers under `prefix`, `top` for the rest) → ours; returns
    (converted, unused HF keys). The MLM decoder's weight is tied to the word embeddings."""
    out, unused = {}, []
    for key, value in state.items():
        k = key.removeprefix(prefix)
        # Old TF-converted checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta.
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        if k in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            out["mlm.decoder.bias"] = value
            continue
        if k == "cls.predictions.decoder.weight":
            continue  # tied to the word embeddings in both models
        mine = _rename(k, top, BERT_LAYER, BERT_LAYER_RE, {})
        if mine is None:
            if not k.endswith("position_ids"):
                unused.append(key)
            continue
        out[mine] = value
    return out, unused


def convert_bert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """HF BERT names → uniter names; returns (converted, unused HF keys)."""
    return convert_bert_like(state, "bert.", BERT_TOP)


def convert_clip_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """HF CLIPModel names → clip recipe names; returns (converted, unused HF keys)."""
    layer_re = re.compile(
        r"(?P<prefix>text|vision)_model\.encoder\.layers\.(?P<i>\d+)\.(?P<sub>.+)"
    )
    out, unused = {}, []
    for key, value in state.items():
        mine = _rename(key, CLIP_TOP, CLIP_LAYER, layer_re, CLIP_PARAMS)
        if mine is None:
            if not key.endswith("position_ids"):
                unused.append(key)
            continue
        if mine.startswith(("text.layers", "vision.layers")):
            tower = "text" if mine.startswith("text") else "image"
            mine = f"{tower}.encoder.{mine.split('.', 1)[1]}"
        out[mine] = value
    return out, unused


# -- configs from shapes -----------------------------------------------------------------------


def _count_layers(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def bert_overrides(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """uniter config fields for a BERT checkpoint (vocab_size included)."""
    cfg = BERT_DEFAULTS | config
    s = {k.removeprefix("bert."): v for k, v in state.items()}
    word = s["embeddings.word_embeddings.weight"]
    return {
        "vocab_size": word.shape[0],
        "hidden": word.shape[1],
        "layers": _count_layers(s, r"^encoder\.layer\.(\d+)\."),
        "heads": int(cfg["num_attention_heads"]),
        "mlp": s["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_len": s["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab": s["embeddings.token_type_embeddings.weight"].shape[0],
        "act": str(cfg["hidden_act"]),
        "eps": float(cfg["layer_norm_eps"]),
        "pad_id": int(cfg["pad_token_id"] if cfg["pad_token_id"] is not None else 0),
        "dropout": float(cfg.get("hidden_dropout_prob", 0.1)),
        "attn_dropout": float(cfg.get("attention_probs_dropout_prob", 0.1)),
    }


def clip_overrides(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """clip config fields for an HF CLIPModel checkpoint (vocab_size included)."""
    text = CLIP_TEXT_DEFAULTS | (config.get("text_config") or {})
    vision = CLIP_VISION_DEFAULTS | (config.get("vision_config") or {})
    tok = state["text_model.embeddings.token_embedding.weight"]
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    n_pos = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(n_pos - 1)
    eos = text["eos_token_id"]
    # HF's rule: configs from before its PR 24773 say eos 2 and pool at the highest token id.
    pool = "argmax" if eos == 2 else "eos"
    return {
        "vocab_size": tok.shape[0],
        "embed_dim": state["text_projection.weight"].shape[0],
        "text_width": tok.shape[1],
        "text_layers": _count_layers(state, r"^text_model\.encoder\.layers\.(\d+)\."),
        "text_heads": int(text["num_attention_heads"]),
        "text_mlp": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "max_len": state["text_model.embeddings.position_embedding.weight"].shape[0],
        "text_pool": pool,
        "eos_token_id": None if pool == "argmax" else int(eos),
        "vision": "vit",
        "image_size": grid * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "vision_width": patch.shape[0],
        "vision_layers": _count_layers(state, r"^vision_model\.encoder\.layers\.(\d+)\."),
        "vision_heads": int(vision["num_attention_heads"]),
        "vision_mlp": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "act": str(text["hidden_act"]),
        "eps": float(text["layer_norm_eps"]),
    }


# -- the entry point ---------------------------------------------------------------------------


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr in seen:
            tied.add(name)
        seen.setdefault(ptr, name)
    return tied


def from_hf(
    source: str | Path | nn.Module,
    config: dict[str, Any] | None = None,
    size: str = "base",
    **overrides: Any,
) -> tuple[Recipe, ConversionReport]:
    """A recipe holding the checkpoint's weights, and what was (not) converted.

    `size` picks the defaults of the fields a checkpoint does not determine (region width and
    classes of a BERT-initialized UNITER); `overrides` replace any field.
    """
    if isinstance(source, nn.Module):
        cfg_obj = getattr(source, "config", None)
        config = config or (cfg_obj.to_dict() if cfg_obj is not None else {})
        state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    else:
        config, state = load_hf_checkpoint(source, config)
    arch = detect_arch(config, state)
    if arch == "clip":
        recipe_name, fields = "clip", clip_overrides(config, state)
        converted, unused = convert_clip_state_dict(state)
    elif arch == "lxmert":
        from vlforge.train.convert_lxmert import convert_lxmert_state_dict, lxmert_overrides

        recipe_name, fields = "lxmert", lxmert_overrides(config, state)
        converted, unused = convert_lxmert_state_dict(state)
    elif arch == "vilt":
        from vlforge.train.convert_vilt import convert_vilt_state_dict, vilt_overrides

        recipe_name, fields = "vilt", vilt_overrides(config, state)
        converted, unused = convert_vilt_state_dict(state)
    elif arch == "visualbert":
        from vlforge.train import convert_visualbert as vb  # it imports this module's helpers

        recipe_name, fields = "visualbert", vb.visualbert_overrides(config, state)
        converted, unused = vb.convert_visualbert_state_dict(state)
    else:
        recipe_name, fields = "uniter", bert_overrides(config, state)
        converted, unused = convert_bert_state_dict(state)
    fields |= overrides
    vocab = fields.pop("vocab_size")
    model = build_recipe(recipe_name, size, vocab, **fields)
    own = model.state_dict()
    for k, v in converted.items():
        if k not in own:
            unused.append(k)
        elif own[k].shape != v.shape:
            raise ConversionError(
                f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            )
    result = model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    tied = _tied_aliases(model)
    missing = [k for k in result.missing_keys if k not in tied]
    report = ConversionReport(recipe_name, fields | {"vocab_size": vocab}, missing, unused)
    return model, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="HF checkpoint directory or weights file")
    ap.add_argument("out", help="directory for model.pt and recipe.json")
    ap.add_argument("--size", default="base")
    args = ap.parse_args(argv)
    try:
        model, report = from_hf(args.source, size=args.size)
    except (ConversionError, OSError, KeyError) as e:
        print(f"convert_hf: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    meta = {"recipe": report.arch, "size": args.size, "recipe_overrides": report.overrides,
            "missing": report.missing, "unused": report.unused}  # fmt: skip
    (out / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{report.arch}: {len(report.missing)} parameters left at init, "
          f"{len(report.unused)} checkpoint tensors unused → {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
