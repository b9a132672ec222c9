"""VILLA (Gan et al. 2020): UNITER pretrained with adversarial training in the embedding space.

The model, tasks and data are UNITER's (uniter.py); `adversarial` is on, so every training batch
adds FreeLB-style perturbations of the text and image embeddings with VILLA's KL consistency
term (train/adversarial.py). Any recipe with the seam gets the same with `--set adversarial=true`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from vlforge.train.recipes.registry import register_recipe
from vlforge.train.recipes.uniter import Uniter, UniterConfig


@register_recipe("villa")
class Villa(Uniter):
    name = "villa"
    sizes: ClassVar[dict[str, UniterConfig]] = {  # type: ignore[assignment]
        size: replace(cfg, adversarial=True) for size, cfg in Uniter.sizes.items()
    }
