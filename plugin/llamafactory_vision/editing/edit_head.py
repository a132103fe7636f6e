"""The MGIE edit head: turns the LLM's hidden states at the 8 ``[IMG]`` tokens into the UNet's text condition.

``Linear(llm_hidden -> 512)`` -> ``nn.Transformer`` (d_model 512, 4 heads, 4 encoder + 4 decoder layers, FF 2048,
pre-norm, no dropout) whose decoder reads 77 learned queries -> ``Linear(512 -> cross_attention_dim)``. Its output
takes the place of the CLIP text embedding (77 tokens) in the UNet's cross-attention. As in MGIE the input is the sum
of the hidden states and the ``[IMG]`` input embeddings, and the null (classifier-free) condition is the head applied
to zero hidden states.

A diffusers ``ModelMixin``: ``save_pretrained`` writes ``config.json`` + ``diffusion_pytorch_model.safetensors``, and
the inference pipeline loads it like any of its components.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class EditHead(ModelMixin, ConfigMixin):
    """Args:
    llm_hidden_size (int): hidden size of the LLM whose states it reads (4096 for LLaVA-1.5-7B).
    cross_attention_dim (int): the UNet's ``config.cross_attention_dim`` (768 for SD-1.5 / InstructPix2Pix).
    num_queries (int, default 77): condition length (CLIP's context length).
    d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward: the transformer (MGIE: 512, 4, 4,
        4, 2048).

    Submodule names (``llm2hid``, ``mapper``, ``hid2feat``) are MGIE's. The head is attached after the host applies
    LoRA, so ``lora_target: all`` never reaches its linear layers.
    """

    @register_to_config
    def __init__(
        self,
        llm_hidden_size: int,
        cross_attention_dim: int,
        num_queries: int = 77,
        d_model: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 2048,
    ):
        super().__init__()
        self.llm2hid = nn.Linear(llm_hidden_size, d_model)
        self.query = nn.Parameter(torch.randn(1, num_queries, d_model))
        self.mapper = nn.Transformer(
            d_model=d_model,
            nhead=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.hid2feat = nn.Linear(d_model, cross_attention_dim)

    def forward(self, hidden: Tensor, embeds: Tensor) -> Tensor:
        """hidden, embeds: ``Tensor[B, T, llm_hidden_size]`` (T = number of [IMG] tokens) -> ``Tensor[B,
        num_queries, cross_attention_dim]``, in the head's dtype."""
        dtype = self.llm2hid.weight.dtype
        memory = self.llm2hid((hidden + embeds).to(dtype))
        queries = self.query.expand(hidden.size(0), -1, -1)
        return self.hid2feat(self.mapper(memory, queries))

    def null_condition(self, embeds: Tensor) -> Tensor:
        """The classifier-free "no instruction" condition (MGIE): the head on zero hidden states. embeds:
        ``Tensor[B, T, llm_hidden_size]`` -> ``Tensor[B, num_queries, cross_attention_dim]``."""
        return self(torch.zeros_like(embeds), embeds)
