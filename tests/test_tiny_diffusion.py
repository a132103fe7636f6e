"""The tiny diffusers folders: the pixel VAE is an identity autoencoder by construction, loaded as any AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from llamafactory_vision.synth import generate_edit
from llamafactory_vision.tiny import build_tiny_diffusion
from PIL import Image


@pytest.fixture(scope="module")
def pixel(tmp_path_factory) -> Path:
    return build_tiny_diffusion(tmp_path_factory.mktemp("pixel"), resolution=16, vae="pixel",
                                prediction_type="v_prediction")  # fmt: skip


def test_pixel_vae_latent_is_the_image(pixel: Path) -> None:
    vae = AutoencoderKL.from_pretrained(pixel / "vae")
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 1  # EditPipeline's vae_scale_factor
    assert vae.config.scaling_factor == 1.0
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mode()).sample
        sample = posterior.sample(generator=torch.Generator().manual_seed(1))
    assert posterior.mode().shape == (3, 4, 16, 16)
    torch.testing.assert_close(posterior.mode()[:, :3], x, atol=1e-4, rtol=0)  # the oracle: the input itself
    assert posterior.mode()[:, 3].abs().max() < 1e-6
    torch.testing.assert_close(sample, posterior.mode(), atol=1e-5, rtol=0)  # posterior std e^-15
    torch.testing.assert_close(decoded, x, atol=1e-4, rtol=0)


def test_pixel_vae_round_trips_an_edit_image_exactly(pixel: Path, tmp_path: Path) -> None:
    """Through the pipeline's own pre/post-processing, a synthetic edit image comes back with the same bytes."""
    generate_edit(tmp_path, n=1, seed=3, val_frac=0.0)
    with Image.open(tmp_path / "images" / "edit_00000_0.png") as image:
        source = image.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
    vae = AutoencoderKL.from_pretrained(pixel / "vae")
    processor = VaeImageProcessor(vae_scale_factor=1)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(processor.preprocess(source)).latent_dist.mode()).sample
    back = processor.postprocess(decoded, output_type="pil")[0]
    assert np.array_equal(np.asarray(back), np.asarray(source))


def test_pixel_folder_unet_and_scheduler(pixel: Path, tmp_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(pixel / "unet")
    assert (unet.config.sample_size, unet.config.in_channels) == (16, 8)  # latent side = image side
    assert DDPMScheduler.from_pretrained(pixel / "scheduler").config.prediction_type == "v_prediction"
    random = build_tiny_diffusion(tmp_path / "random", resolution=32)  # the default layout is unchanged
    assert json.loads((random / "unet" / "config.json").read_text())["sample_size"] == 4
    assert len(json.loads((random / "vae" / "config.json").read_text())["block_out_channels"]) == 4
    with pytest.raises(ValueError, match="`vae` must be 'random' or 'pixel', got 'identity'"):
        build_tiny_diffusion(tmp_path / "bad", vae="identity")
