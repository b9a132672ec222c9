"""`vlforge generate --recipe dalle`: N images per caption from a `dalle` run, reranked by a `clip`
run (--clip-ckpt), written as a PNG grid per caption plus index.json / index.html
(train/dalle_sampling.py does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlforge.errors import UserError
from vlforge.train.generators import register_generator

DEFAULT_N = 8
# Sampling settings (the command has no flags for them): top-k over half the codebook, as
# common DALL-E reimplementations filter, at temperature 1.
TEMPERATURE = 1.0
TOP_K_FRACTION = 0.5


def read_captions(args: argparse.Namespace) -> list[str]:
    """Captions from --captions (one a line, blank lines skipped) or the shards' `txt`."""
    if bool(args.captions) == bool(args.shards):
        raise UserError("dalle generates from captions: give exactly one of --captions or --shards")
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            raise UserError(f"captions file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"captions file is not UTF-8 text: {path}") from None
        captions = [" ".join(line.split()) for line in lines if line.strip()]
    else:
        from vlforge.train.data import expand_shards
        from vlforge.train.tokenizer import corpus_captions

        captions = list(corpus_captions(expand_shards(args.shards), args.limit))
    captions = captions[: args.limit] if args.limit else captions
    if not captions:
        raise UserError(f"no captions in {args.captions or args.shards}")
    return captions


@register_generator("dalle")
def generate_dalle(args: argparse.Namespace) -> int:
    from vlforge.train.dalle_sampling import generate, write_results
    from vlforge.train.recipes.dalle import Dalle
    from vlforge.train.trainer import load_for_eval

    if args.max_len is not None:
        raise UserError(
            "--max-len does not apply to dalle: it samples a fixed grid of image tokens"
        )
    captions = read_captions(args)
    model, tok, spec = load_for_eval(args.ckpt)
    if not isinstance(model, Dalle):
        raise UserError(f"--ckpt {args.ckpt} is a {getattr(model, 'name', '?')} run, not dalle")
    clip = None
    if args.clip_ckpt:
        clip = load_for_eval(args.clip_ckpt)
        if not all(callable(getattr(clip[0], f, None)) for f in ("encode_image", "encode_text")):
            raise UserError(f"--clip-ckpt {args.clip_ckpt} is not a dual-encoder (clip) run")
    else:
        sys.stderr.write("generate: no --clip-ckpt; candidates are left in sampling order\n")
    n = args.n or DEFAULT_N
    top_k = max(1, int(model.codes * TOP_K_FRACTION))
    results = generate(model, tok, spec, captions, n, clip, TEMPERATURE, top_k, args.seed)
    index = write_results(results, args.out)
    print(f"{n} images for each of {len(captions)} captions → {args.out} (index: {index.name})")
    return 0
