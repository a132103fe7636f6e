"""Diffusers glue for the edit stage: load the UNet/VAE/scheduler, widen ``conv_in``, and the diffusion loss.

Image tensors are ``Tensor[B, 3, R, R]`` in [-1, 1] (R = ``edit_resolution``); latents ``Tensor[B, 4, R/8, R/8]``.
The target latent is a posterior sample scaled by ``vae.config.scaling_factor`` (0.18215 for SD-1.5); the source
latent is the posterior mode, unscaled, as in InstructPix2Pix and MGIE.

Randomness is drawn per sample from a generator seeded by (run seed, optimizer step, row key), never from the global
RNG: the same row at the same step gets the same noise, timestep and dropout draw whatever the number of processes,
the batch it lands in, or a resume from a checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

LATENT_CHANNELS = 4
EDIT_IN_CHANNELS = 2 * LATENT_CHANNELS  # noisy target latent + source latent


@dataclass
class DiffusionParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler


def load_diffusion(path: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionParts:
    """Load ``unet/``, ``vae/`` and ``scheduler/`` from a local diffusers folder (InstructPix2Pix or SD-1.5 layout).

    A 4-channel UNet (SD-1.5) gets ``conv_in`` widened to 8 channels (see :func:`widen_conv_in`); any other input
    width is refused.
    """
    path = Path(path)
    for sub in ("unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(
                f"`diffusion_model_name_or_path`: {path} has no {sub}/ folder; expected a local diffusers folder "
                "such as timbrooks/instruct-pix2pix or runwayml/stable-diffusion-v1-5."
            )
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    if unet.config.in_channels == LATENT_CHANNELS:
        widen_conv_in(unet)
    elif unet.config.in_channels != EDIT_IN_CHANNELS:
        raise ValueError(
            f"{path / 'unet'}: in_channels={unet.config.in_channels}; editing needs {EDIT_IN_CHANNELS} (noisy target "
            f"+ source latents) or {LATENT_CHANNELS} (widened here)."
        )
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return DiffusionParts(unet=unet, vae=vae, scheduler=scheduler)


@torch.no_grad()
def widen_conv_in(unet: UNet2DConditionModel, in_channels: int = EDIT_IN_CHANNELS) -> None:
    """Give ``unet.conv_in`` ``in_channels`` inputs: the old weights for the first channels, zeros for the new ones
    (InstructPix2Pix's recipe: the widened UNet starts out exactly as the original on the noisy latent)."""
    old = unet.conv_in
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def sample_seed(seed: int, step: int, key: int) -> int:
    """A 63-bit seed for one sample's draws at one optimizer step (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generators(seed: int, step: int, keys: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, key)) for key in keys]


def cfg_masks(p: Tensor, dropout: float) -> tuple[Tensor, Tensor]:
    """MGIE's classifier-free dropout from one uniform draw per sample.

    p: ``Tensor[B]`` in [0, 1); dropout d. Returns ``(null_text, null_image)``, ``BoolTensor[B]`` each:
    null text condition where ``p < 2d``, null source image where ``d <= p < 3d`` (both where ``d <= p < 2d``).
    """
    null_text = p < 2 * dropout
    null_image = (p >= dropout) & (p < 3 * dropout)
    return null_text, null_image


@dataclass
class DiffusionDraws:
    """Per-sample random draws for one step: ``p`` ``Tensor[B]`` (CFG dropout), ``timesteps`` ``LongTensor[B]``,
    ``generators`` (one per sample, positioned after those two draws, for the noise and the posterior sample)."""

    p: Tensor
    timesteps: Tensor
    generators: list[torch.Generator]


def draw(generators: list[torch.Generator], num_train_timesteps: int) -> DiffusionDraws:
    p = torch.stack([torch.rand((), generator=g) for g in generators])
    timesteps = torch.stack([torch.randint(0, num_train_timesteps, (), generator=g) for g in generators])
    return DiffusionDraws(p=p, timesteps=timesteps, generators=generators)


def noise_target(scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet learns to predict: the noise (``epsilon``) or the velocity (``v_prediction``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction).")


def edit_diffusion_loss(
    parts: DiffusionParts,
    condition: Tensor,
    null_condition: Tensor,
    source_pixels: Tensor,
    target_pixels: Tensor,
    draws: DiffusionDraws,
    cfg_dropout: float,
) -> Tensor:
    """The noise-prediction MSE of one batch (mean over all elements, as MGIE).

    condition, null_condition: ``Tensor[B, 77, cross_attention_dim]`` from the edit head; source_pixels,
    target_pixels: ``Tensor[B, 3, R, R]`` in [-1, 1]; draws: from :func:`draw`. Returns a scalar float32 tensor.
    """
    unet, vae, scheduler = parts.unet, parts.vae, parts.scheduler
    device, dtype = condition.device, vae.dtype
    # 1. Latents (frozen VAE): target = scaled posterior sample, source = posterior mode (unscaled).
    with torch.no_grad():
        target_dist = vae.encode(target_pixels.to(dtype)).latent_dist
        target_latents = target_dist.sample(generator=draws.generators) * vae.config.scaling_factor
        source_latents = vae.encode(source_pixels.to(dtype)).latent_dist.mode()
    # 2. Forward diffusion at the drawn timesteps.
    noise = randn_tensor(target_latents.shape, generator=draws.generators, device=device, dtype=dtype)
    timesteps = draws.timesteps.to(device)
    noisy = scheduler.add_noise(target_latents, noise, timesteps)
    # 3. Classifier-free dropout: null text condition and/or zeroed source latent.
    null_text, null_image = (m.to(device) for m in cfg_masks(draws.p, cfg_dropout))
    condition = torch.where(null_text[:, None, None], null_condition, condition)
    source_latents = source_latents * (~null_image).to(dtype)[:, None, None, None]
    # 4. Predict and compare.
    unet_dtype = unet.dtype
    pred = unet(
        torch.cat([noisy, source_latents], dim=1).to(unet_dtype), timesteps, condition.to(unet_dtype)
    ).sample
    target = noise_target(scheduler, target_latents, noise, timesteps)
    return nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
