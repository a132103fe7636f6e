"""The coupled forward of the edit stage: [IMG] hidden states -> edit head -> UNet noise-prediction loss.

Kept free of LLaMA-Factory imports so that the benchmark (benchmarks/bench_edit.py) runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llamafactory_vision.editing.diffusion import DiffusionParts, draw, edit_diffusion_loss
from llamafactory_vision.editing.edit_head import EditHead


@dataclass(frozen=True)
class EditLossConfig:
    diffusion_weight: float
    cfg_dropout: float
    img_token_ids: tuple[int, ...]


def edit_loss(
    head: EditHead,
    parts: DiffusionParts,
    hidden: Tensor,
    input_embeddings: nn.Module,
    inputs: dict[str, Tensor],
    generators: list[torch.Generator],
    config: EditLossConfig,
) -> Tensor:
    """The diffusion loss of one batch, coupled to the LLM through the [IMG] hidden states.

    hidden: ``Tensor[B, L, H]`` last hidden states; inputs: ``edit_positions`` (``LongTensor[B, 8]``),
    ``edit_source_pixels`` and ``edit_target_pixels`` (``Tensor[B, 3, R, R]`` in [-1, 1]) as made by ``EditCollator``;
    input_embeddings: the LLM's input embedding module; generators: one per sample (see diffusion.py). Returns a
    scalar.
    """
    # 1. The LLM's hidden states that predict [IMG0]..[IMG7], and the [IMG] input embeddings (MGIE sums them).
    positions = inputs["edit_positions"]
    rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
    img_hidden = hidden[rows, positions]  # [B, 8, H]
    ids = torch.tensor(config.img_token_ids, device=hidden.device)
    img_embeds = input_embeddings(ids)[None].expand(hidden.size(0), -1, -1)
    # 2. Edit head: the UNet condition and the null ("no instruction") condition.
    condition = head(img_hidden, img_embeds)
    null_condition = head.null_condition(img_embeds)
    # 3. Per-sample draws: CFG dropout p, timestep, then noise and the target posterior sample.
    draws = draw(generators, parts.scheduler.config.num_train_timesteps)
    # 4. Noise-prediction loss on the target latent, conditioned on the source latent.
    return edit_diffusion_loss(
        parts,
        condition,
        null_condition,
        inputs["edit_source_pixels"],
        inputs["edit_target_pixels"],
        draws,
        config.cfg_dropout,
    )
