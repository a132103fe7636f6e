"""Tiny random MG-LLaVA parts: a ConvNeXt high-resolution branch matching the tiny LLaVA's CLIP grid.

The tiny LLaVA (tiny/vlm.py) sees 32 px through 8 px patches: a 4 x 4 token grid. A ConvNeXt with a 4 px stem and
three 2x downsamples has stride 32, so at ``TINY_HR_IMAGE_SIZE`` = 128 px its last map is 4 x 4 too, as 768 / 32 =
24 = 336 / 14 for the real MG-LLaVA.

    python -m llamafactory_vision.tiny --out DIR   # the VLMs;  build_tiny_convnext(DIR / "convnext") for this one
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel

TINY_HR_IMAGE_SIZE = 128


def build_tiny_convnext(out_dir: str | Path, seed: int = 0, hidden_sizes: tuple[int, ...] = (8, 16, 24, 32)) -> Path:
    """Write a random 4-stage ConvNeXt (one block per stage, stride 32) to ``out_dir`` and return that path.

    Same arguments, byte-identical ``model.safetensors``; the caller's torch RNG state is left untouched.
    """
    config = ConvNextConfig(num_channels=3, patch_size=4, num_stages=len(hidden_sizes),
                            hidden_sizes=list(hidden_sizes), depths=[1] * len(hidden_sizes),
                            image_size=TINY_HR_IMAGE_SIZE)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNextModel(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
