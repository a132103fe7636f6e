"""Tiny, random, fully offline checkpoints for tests and demos: one module per capability.

- :mod:`.vlm`: the chat VLM families LLaMA-Factory loads as ``model_name_or_path`` (Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL, LLaVA-1.5).
- :mod:`.mg_llava`: the ConvNeXt high-resolution branch of MG-LLaVA, sized for the tiny LLaVA.
- :mod:`.diffusion`: an 8-channel (InstructPix2Pix) or 4-channel (SD-1.5) UNet + VAE + scheduler folder (the VAE
  random, or the pixel VAE whose latent is the image, for runs that must show learning), and a CLIP model with a
  character vocabulary (editing).

``python -m llamafactory_vision.tiny --out DIR`` writes them (see :func:`.vlm.main`).
"""

from llamafactory_vision.tiny.diffusion import build_tiny_clip, build_tiny_diffusion
from llamafactory_vision.tiny.mg_llava import TINY_HR_IMAGE_SIZE, build_tiny_convnext
from llamafactory_vision.tiny.vlm import (
    FAMILIES,
    LLAVA_LEADING_TOKENS,
    LLAVA_TRAILING_TOKENS,
    QWEN_SPECIAL_TOKENS,
    build_tiny,
    main,
    train_byte_level_bpe,
)

__all__ = [
    "FAMILIES",
    "LLAVA_LEADING_TOKENS",
    "LLAVA_TRAILING_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "TINY_HR_IMAGE_SIZE",
    "build_tiny",
    "build_tiny_clip",
    "build_tiny_convnext",
    "build_tiny_diffusion",
    "main",
    "train_byte_level_bpe",
]
