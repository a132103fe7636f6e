"""The diffusion half of the edit loss, checked against a hand computation from the DDPM formulas."""

from __future__ import annotations

import math

import pytest
import torch
from llamafactory_vision.editing.diffusion import (
    cfg_masks,
    draw,
    edit_diffusion_loss,
    load_diffusion,
    sample_generators,
)
from llamafactory_vision.editing.edit_head import EditHead


def test_cfg_masks_match_mgie_ranges():
    p = torch.tensor([0.0, 0.049, 0.05, 0.099, 0.1, 0.149, 0.15, 0.5, 0.999])
    null_text, null_image = cfg_masks(p, 0.05)
    # MGIE: text nulled for p < 0.10; image nulled for 0.05 <= p < 0.15
    assert null_text.tolist() == [True, True, True, True, False, False, False, False, False]
    assert null_image.tolist() == [False, False, True, True, True, True, False, False, False]


def test_cfg_rates_over_many_draws():
    generators = sample_generators(seed=0, step=3, keys=list(range(20000)))
    p = draw(generators, 1000).p
    null_text, null_image = cfg_masks(p, 0.05)
    assert null_text.float().mean().item() == pytest.approx(0.10, abs=0.01)
    assert null_image.float().mean().item() == pytest.approx(0.10, abs=0.01)
    assert (null_text & null_image).float().mean().item() == pytest.approx(0.05, abs=0.01)


def test_draws_depend_on_seed_step_and_key_only():
    a = draw(sample_generators(0, 5, [11, 12]), 1000)
    b = draw(sample_generators(0, 5, [12, 11]), 1000)  # another batch order
    assert a.p.tolist() == b.p.flip(0).tolist() and a.timesteps.tolist() == b.timesteps.flip(0).tolist()
    c = draw(sample_generators(0, 6, [11, 12]), 1000)
    assert a.p.tolist() != c.p.tolist()


def _alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's scaled-linear schedule written out: betas = linspace(sqrt(b0), sqrt(b1), T)**2."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("p_values", [(0.5, 0.5), (0.07, 0.12)])  # no dropout / text nulled + image nulled
def test_diffusion_loss_matches_hand_computation(edit_models, p_values):
    parts = load_diffusion(edit_models["ip2p"])
    torch.manual_seed(0)
    head = EditHead(llm_hidden_size=16, cross_attention_dim=parts.unet.config.cross_attention_dim, d_model=32,
                    num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)  # fmt: skip
    hidden, embeds = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    source, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    condition, null = head(hidden, embeds), head.null_condition(embeds)

    draws = draw(sample_generators(1, 2, [7, 8]), 1000)
    draws.p = torch.tensor(p_values)  # force the dropout branch under test
    loss = edit_diffusion_loss(parts, condition, null, source, target, draws, 0.05)

    # by hand, replaying each sample's generator: posterior noise, then diffusion noise
    replay = sample_generators(1, 2, [7, 8])
    draw(replay, 1000)  # advance past p and t, as the code under test does
    with torch.no_grad():
        dist = parts.vae.encode(target).latent_dist
        post = torch.cat([torch.randn((1, 4, 4, 4), generator=g) for g in replay])
        noise = torch.cat([torch.randn((1, 4, 4, 4), generator=g) for g in replay])
        latents = (dist.mean + dist.std * post) * 0.18215
        acp = _alphas_cumprod()[draws.timesteps].float()[:, None, None, None]
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * noise
        src = parts.vae.encode(source).latent_dist.mode()
        cond = condition.clone()
        for i, p in enumerate(p_values):
            if p < 0.10:
                cond[i] = null[i]
            if 0.05 <= p < 0.15:
                src[i] = 0
        pred = parts.unet(torch.cat([noisy, src], 1), draws.timesteps, cond).sample
        expected = ((pred - noise) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_edit_head_shapes_and_null_condition():
    head = EditHead(llm_hidden_size=16, cross_attention_dim=24, d_model=32, num_encoder_layers=1,
                    num_decoder_layers=1, dim_feedforward=64)  # fmt: skip
    embeds = torch.randn(3, 8, 16)
    out = head(torch.randn(3, 8, 16), embeds)
    assert out.shape == (3, 77, 24)
    assert torch.equal(head.null_condition(embeds), head(torch.zeros(3, 8, 16), embeds))


def test_mgie_head_size():
    head = EditHead(llm_hidden_size=4096, cross_attention_dim=768)
    mapper = head.mapper
    assert len(mapper.encoder.layers) == 4 and len(mapper.decoder.layers) == 4
    assert mapper.encoder.layers[0].linear1.out_features == 2048 and mapper.d_model == 512
    assert mapper.encoder.layers[0].norm_first and head.query.shape == (1, 77, 512)


def test_sd15_conv_in_widened_with_zero_weights(edit_models):
    parts = load_diffusion(edit_models["sd15"])
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(edit_models["sd15"] / "unet")
    assert parts.unet.config.in_channels == 8 and parts.unet.conv_in.in_channels == 8
    assert torch.equal(parts.unet.conv_in.weight[:, :4], original.conv_in.weight)
    assert torch.count_nonzero(parts.unet.conv_in.weight[:, 4:]) == 0
    # the widened UNet ignores the source latent at first: same output as the 4-channel one
    x, t, cond = torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        wide = parts.unet(torch.cat([x, torch.randn_like(x)], 1), t, cond).sample
        ref = original(x, t, cond).sample
    torch.testing.assert_close(wide, ref)
