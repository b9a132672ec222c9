"""DALL-E stage 3 (Ramesh et al. 2021, §2.3): sample image tokens from a trained `dalle` recipe,
decode them with its dVAE, rerank the candidates by a trained `clip` recipe, and write a PNG grid
per caption with an index (index.json, index.html) of captions next to their images.

Sampling is the plain autoregressive loop without a key/value cache: every step reruns the
decoder on the prefix (grid² steps, fine at the sizes trained here), with temperature and top-k.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils
from PIL import Image

from vlforge.train.collate import CLIP_MEAN, CLIP_STD, Assembler, BatchSpec, image_to_tensor
from vlforge.train.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from vlforge.train.recipes.dalle import Dalle


@torch.no_grad()
def sample_image_tokens(
    model: Dalle,
    batch: dict[str, torch.Tensor],
    n: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B·n)×grid² image tokens, n samples per caption of `batch` (input_ids, attention_mask),
    the rows of caption b at b·n … b·n + n − 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    ids, mask = model.fixed_text(batch)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    tokens = torch.zeros(len(ids), 0, dtype=torch.long, device=ids.device)
    k = model.codes if top_k is None else max(1, min(top_k, model.codes))
    for _ in range(model.grid * model.grid):
        logits = model.image_head(model.hidden(ids, mask, tokens)[:, -1]).float() / temperature
        # Top-k: the rest of the codebook gets probability zero.
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels (the loader's and the dVAE's space) → [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """B×3×H×W in [0, 1] → RGB images."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def decode_tokens(model: Dalle, tokens: torch.Tensor) -> torch.Tensor:
    """dVAE decoding of image tokens → B×3×S×S in [0, 1]."""
    return to_unit_range(model.dvae.decode(tokens))


@torch.no_grad()
def clip_scores(
    clip: Any, tokenizer: TextTokenizer, spec: BatchSpec, caption: str, images: list[Image.Image]
) -> torch.Tensor:
    """Cosine similarity of `caption` to each image under a `clip` recipe, with that run's own
    tokenizer and its training preprocessing (train/collate.py)."""
    device = next(clip.parameters()).device
    text = Assembler(spec, tokenizer).text(
        [caption], np.zeros(1, dtype=bool), np.random.default_rng()
    )
    text = {k: v.to(device) for k, v in text.items()}
    pixels = torch.stack([image_to_tensor(im.convert("RGB"), spec.image_size) for im in images])
    t = F.normalize(clip.encode_text(text).float(), dim=-1)
    v = F.normalize(clip.encode_image({"pixel_values": pixels.to(device)}).float(), dim=-1)
    return (v @ t.T)[:, 0].cpu()


def rerank(
    clip: Any, tokenizer: TextTokenizer, spec: BatchSpec, caption: str, images: list[Image.Image]
) -> tuple[list[int], list[float]]:
    """Indices of `images` best match first, and each image's score (in the original order)."""
    scores = clip_scores(clip, tokenizer, spec, caption, images)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return order, scores.tolist()


@dataclass
class Generated:
    """One caption's candidates, best first (sampling order when there was no reranker)."""

    caption: str
    images: list[Image.Image]
    scores: list[float] | None  # CLIP cosine per image, same order; None without a reranker


def generate(
    model: Dalle,
    tokenizer: TextTokenizer,
    spec: BatchSpec,
    captions: list[str],
    n: int,
    clip: tuple[Any, TextTokenizer, BatchSpec] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[Generated]:
    """n images per caption from a `dalle` model, reranked by `clip` = (model, tokenizer, spec)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    asm = Assembler(spec, tokenizer)
    out: list[Generated] = []
    for caption in captions:
        batch = asm.text([caption], np.zeros(1, dtype=bool), np.random.default_rng())
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = sample_image_tokens(model, batch, n, temperature, top_k, generator)
        images = to_pil(decode_tokens(model, tokens))
        scores = None
        if clip is not None:
            order, raw = rerank(*clip, caption, images)
            images, scores = [images[i] for i in order], [raw[i] for i in order]
        out.append(Generated(caption, images, scores))
    return out


def write_results(results: list[Generated], out: str | Path) -> Path:
    """DIR/caption_NNNN.png (the candidates in a row, best first), DIR/index.json and
    DIR/index.html (each caption next to its grid and scores); returns the index.json path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, r in enumerate(results):
        name = f"caption_{i:04d}.png"
        tiles = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in r.images])
        grid = torchvision.utils.make_grid(tiles.float() / 255, nrow=len(tiles), padding=2)
        to_pil(grid[None])[0].save(out / name)
        entries.append({"caption": r.caption, "grid": name, "n": len(r.images), "scores": r.scores})
    index = out / "index.json"
    tmp = out / ".index.json.tmp"
    reranked = all(e["scores"] is not None for e in entries)
    tmp.write_text(json.dumps({"reranked": reranked, "items": entries}, indent=2) + "\n")
    tmp.replace(index)
    rows = []
    for e in entries:
        scores = ", ".join(f"{s:.3f}" for s in e["scores"]) if e["scores"] else "not reranked"
        rows.append(
            f'<tr><td>{html.escape(e["caption"])}</td><td><img src="{e["grid"]}"></td>'
            f"<td>{scores}</td></tr>"
        )
    (out / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><title>dalle samples</title>\n'
        "<table><tr><th>caption</th><th>candidates, best first</th><th>CLIP score</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n"
    )
    return index
