"""Tiny random diffusers and CLIP checkpoints for the editing tests and demo (offline, seconds to build).

- :func:`build_tiny_diffusion`: a diffusers folder like ``timbrooks/instruct-pix2pix`` (``unet/`` with 8 input
  channels, ``vae/``, ``scheduler/``), or like ``runwayml/stable-diffusion-v1-5`` with ``in_channels=4`` (the edit
  stage widens its ``conv_in``). Its VAE is random (SD's layout, 8x downsampling), or with ``vae="pixel"`` the
  :func:`pixel_vae`, whose latent is the image itself, so that a tiny run can learn an edit that shows in pixels.
- :func:`build_tiny_clip`: a ``CLIPModel`` + ``CLIPProcessor`` whose tokenizer is a hand-made character vocabulary
  (no merges), loadable by ``eval/edit_eval.py`` and torchmetrics' ``CLIPScore``.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
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


# pixel_vae: every GroupNorm group holds 4 channels (a, -a, +K, -K); see its docstring.
PIXEL_GROUP = 4
PIXEL_K = 100.0  # the group variance is (E[a^2] + K^2) / 2: K^2 / 2 to 1 part in 2 K^2 / E[a^2] (2e4 for |a| <= 1)
PIXEL_SHIFT = 20.0  # puts SiLU's input in its linear range: SiLU(y) = y - y * sigmoid(-y), and 21 * e^-19 = 1e-7
PIXEL_LOGVAR = -30.0  # the posterior's log-variance (diffusers clamps it at -30): std e^-15 = 3e-7


def _pass_through(conv: nn.Conv2d, norm: nn.GroupNorm, n: int) -> None:
    """Make ``conv`` write input channel g < n as the group of output channels 4g..4g+3 = (x_g, -x_g, K, -K) and
    every other group as (0, 0, K, -K) (centre tap of the 3x3 kernel and the bias: the zero padding never enters),
    and ``norm`` (the GroupNorm before the output convolution) give x_g + SHIFT in channel 4g and 0 elsewhere."""
    for g in range(conv.out_channels // PIXEL_GROUP):
        if g < n:
            conv.weight[PIXEL_GROUP * g, g, 1, 1] = 1.0
            conv.weight[PIXEL_GROUP * g + 1, g, 1, 1] = -1.0
            norm.weight[PIXEL_GROUP * g] = PIXEL_K / math.sqrt(2)
            norm.bias[PIXEL_GROUP * g] = PIXEL_SHIFT
        conv.bias[PIXEL_GROUP * g + 2] = PIXEL_K
        conv.bias[PIXEL_GROUP * g + 3] = -PIXEL_K


def _read_out(conv: nn.Conv2d, n: int) -> None:
    """Make output channel g < n of ``conv`` = its input channel 4g - SHIFT (centre tap); the others 0."""
    for g in range(n):
        conv.weight[g, PIXEL_GROUP * g, 1, 1] = 1.0
        conv.bias[g] = -PIXEL_SHIFT


def pixel_vae(sample_size: int = 32) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` whose latent is the RGB image itself (latent channels 0-2; channel 3 is 0), by
    construction rather than by training: one block (no downsampling: VAE scale factor 1), scaling factor 1, and
    ``decode(encode(x))`` equal to x to ~4e-5 for pixels in [-1, 1].

    How: every residual branch ends in a zero convolution (each ResNet block is the identity) and the mid-block has
    no attention, which leaves ``conv_in -> GroupNorm -> SiLU -> conv_out`` in the encoder and in the decoder. The
    GroupNorm would remove each image's mean and scale, so ``conv_in`` writes every value a as a group of 4 channels
    (a, -a, K, -K): the group mean is exactly 0 and the variance (E[a^2] + K^2) / 2 is K^2 / 2 to 1 part in 2e4, so
    the norm's scale K / sqrt(2) gives a back; its shift puts SiLU in its linear range and ``conv_out`` takes the
    shift off. The encoder's log-variance is -30 (posterior std 3e-7): a posterior sample is the mode. Latents
    outside [-1, 1] (a sampler's raw output) decode monotonically and are clipped by the image post-processing.
    """
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4 * PIXEL_GROUP,),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                module.weight.zero_()
                module.bias.zero_()
        encoder, decoder = vae.encoder, vae.decoder
        _pass_through(encoder.conv_in, encoder.conv_norm_out, n=3)
        _read_out(encoder.conv_out, n=3)
        encoder.conv_out.bias[vae.config.latent_channels :] = PIXEL_LOGVAR
        _pass_through(decoder.conv_in, decoder.conv_norm_out, n=3)
        _read_out(decoder.conv_out, n=3)
    return vae


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD-1.5's training scheduler: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon prediction (or
    ``v_prediction``, as SD-2)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def build_tiny_diffusion(
    out_dir: str | Path,
    seed: int = 0,
    in_channels: int = 8,
    resolution: int = 32,
    vae: Literal["random", "pixel"] = "random",
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
) -> Path:
    """Write ``unet/``, ``vae/``, ``scheduler/`` into ``out_dir`` and return it.

    in_channels: 8 (InstructPix2Pix layout) or 4 (SD-1.5 layout). vae: ``"random"`` (SD's layout, latent side
    ``resolution / 8``) or ``"pixel"`` (:func:`pixel_vae`, latent side ``resolution``; the UNet is sized to match).
    prediction_type: what the UNet learns to predict. With ``v_prediction`` the error of the sampler's x0 estimate is
    at most the model's error, where epsilon multiplies it by sigma (up to 14.6 on SD's schedule): a tiny model
    trained for a hundred steps then samples recognisable images. The caller's torch RNG state is left untouched.
    """
    if vae not in ("random", "pixel"):
        raise ValueError(f"`vae` must be 'random' or 'pixel', got {vae!r}.")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latent_side = resolution if vae == "pixel" else resolution // 8
        tiny_unet(in_channels, sample_size=latent_side).save_pretrained(out / "unet")
        (pixel_vae(resolution) if vae == "pixel" else tiny_vae(resolution)).save_pretrained(out / "vae")
    sd_scheduler(prediction_type).save_pretrained(out / "scheduler")
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
