"""Tiny random diffusers and CLIP checkpoints for the editing tests and demo (offline, seconds to build).

- :func:`build_tiny_diffusion`: a diffusers folder like ``timbrooks/instruct-pix2pix`` (``unet/`` with 8 input
  channels, ``vae/``, ``scheduler/``), or like ``runwayml/stable-diffusion-v1-5`` with ``in_channels=4`` (the edit
  stage widens its ``conv_in``).
- :func:`build_tiny_clip`: a ``CLIPModel`` + ``CLIPProcessor`` whose tokenizer is a hand-made character vocabulary
  (no merges), loadable by ``eval/edit_eval.py`` and torchmetrics' ``CLIPScore``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY_CROSS_ATTENTION_DIM = 32
CLIP_IMAGE_SIZE = 32


def tiny_unet(in_channels: int = 8, sample_size: int = 4) -> UNet2DConditionModel:
    """A 2-level UNet (16/32 channels, one cross-attention level), cross_attention_dim 32."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_vae(sample_size: int = 32) -> AutoencoderKL:
    """4 encoder blocks (3 downsamplings: factor 8, as SD's VAE), 4 latent channels, SD's scaling factor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def sd_scheduler() -> DDPMScheduler:
    """SD-1.5's training scheduler: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_tiny_diffusion(out_dir: str | Path, seed: int = 0, in_channels: int = 8, resolution: int = 32) -> Path:
    """Write ``unet/``, ``vae/``, ``scheduler/`` into ``out_dir`` and return it. ``in_channels``: 8 (InstructPix2Pix
    layout) or 4 (SD-1.5 layout). The caller's torch RNG state is left untouched."""
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny_unet(in_channels, sample_size=resolution // 8).save_pretrained(out / "unet")
        tiny_vae(resolution).save_pretrained(out / "vae")
    sd_scheduler().save_pretrained(out / "scheduler")
    return out


def _char_vocab() -> dict[str, int]:
    """CLIP's BPE vocabulary without merges: every printable character alone and word-final (``</w>``)."""
    chars = [c for c in string.printable if not c.isspace()]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A ~0.1 M parameter CLIP (ViT 32 px / patch 8, 2-layer text encoder, 16-d projection) + its processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _char_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": CLIP_IMAGE_SIZE, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
