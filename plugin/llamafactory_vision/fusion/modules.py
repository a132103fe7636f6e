"""MG-LLaVA's added modules: Conv-Gate fusion, object pooling (roi_align) and the object projector.

Shapes: ``B`` images, ``N = G * G`` low-resolution CLIP tokens of width ``D`` (``G`` = 24 for ViT-L/14 at 336),
a high-resolution feature map ``Tensor[B, C, G, G]`` (ConvNeXt's last stage at ``mg_hr_image_size``), ``K`` boxes
per image. Boxes for :func:`pool_objects` are ``xyxy`` in pixels of the square high-resolution input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


class ConvGateFusion(nn.Module):
    """MG-LLaVA's Conv-Gate (its ``DualPathFuseModule``): ``out = low' + high_proj(high) * tanh(gate(mean tokens))``.

    ``low' = low + fast_proj(gelu(fast_conv(low)))`` (7x7 depth-wise conv over the token grid) and
    ``high_proj = slow_proj(gelu(slow_conv(high)))`` (1x1 convs to width ``D``); the gate is an MLP on the mean over
    tokens of ``[low', high_proj]``. ``fast_proj`` and ``slow_proj`` start at zero, so at step 0 ``out == low``
    exactly and the model is plain LLaVA; gradients still reach them (through the non-zero gate) from step 1.
    Layer names carry an ``mg_`` prefix so ``lora_target: all`` never matches them.
    """

    def __init__(self, low_dim: int, high_dim: int):
        super().__init__()
        self.mg_slow_conv = nn.Conv2d(high_dim, high_dim, 1)
        self.mg_slow_proj = nn.Conv2d(high_dim, low_dim, 1)
        self.mg_fast_conv = nn.Conv2d(low_dim, low_dim, 7, padding=3, groups=low_dim)
        self.mg_fast_proj = nn.Conv2d(low_dim, low_dim, 1)
        self.mg_gate_fc1 = nn.Linear(2 * low_dim, max(low_dim // 2, 1))
        self.mg_gate_fc2 = nn.Linear(max(low_dim // 2, 1), 1)
        for conv in (self.mg_slow_conv, self.mg_fast_conv):
            nn.init.xavier_uniform_(conv.weight)
        for conv in (self.mg_slow_proj, self.mg_fast_proj):
            nn.init.zeros_(conv.weight)
        for conv in (self.mg_slow_conv, self.mg_fast_conv, self.mg_slow_proj, self.mg_fast_proj):
            nn.init.zeros_(conv.bias)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """low: ``Tensor[B, N, D]`` CLIP tokens (row-major ``G x G`` grid); high: ``Tensor[B, C, G, G]``.

        Returns ``Tensor[B, N, D]`` in ``low``'s dtype.
        """
        batch, tokens, width = low.shape
        side = math.isqrt(tokens)
        if side * side != tokens or high.shape[-2:] != (side, side):
            raise ValueError(
                f"Conv-Gate fusion needs a square token grid equal to the high-res feature map: {tokens} tokens, "
                f"feature map {tuple(high.shape[-2:])}. Set `mg_hr_image_size` = {side} x the ConvNeXt's stride."
            )
        dtype = self.mg_fast_proj.weight.dtype
        x = low.to(dtype).transpose(1, 2).reshape(batch, width, side, side)
        x = x + self.mg_fast_proj(F.gelu(self.mg_fast_conv(x)))
        x = x.reshape(batch, width, tokens).transpose(1, 2)
        h = self.mg_slow_proj(F.gelu(self.mg_slow_conv(high.to(dtype)))).reshape(batch, width, tokens).transpose(1, 2)
        gate = self.mg_gate_fc2(F.gelu(self.mg_gate_fc1(torch.cat([x, h], dim=-1).mean(dim=1)))).unsqueeze(1)
        return (x + h * gate.tanh()).to(low.dtype)


def pool_objects(features: Tensor, boxes: list[Tensor], image_size: int, output_size: int) -> Tensor:
    """One vector per box: ``roi_align`` over the feature map, averaged over its ``output_size``^2 samples.

    Args:
        features: ``Tensor[B, C, G, G]``, the feature map of square ``image_size`` x ``image_size`` inputs.
        boxes: ``B`` tensors ``Tensor[K_b, 4]``, ``xyxy`` in pixels of that square input (``0 <= x1 < x2 <=
            image_size``), pixel edges, so ``spatial_scale = G / image_size`` and ``aligned=True`` (feature cell
            ``i`` covers pixels ``[i, i + 1) / scale``, its centre at ``(i + 0.5) / scale``).
        image_size: side of the square input in pixels.
        output_size: roi_align's output side ``s``; ``sampling_ratio=2`` bilinear samples per output bin and axis.

    Returns:
        ``Tensor[sum K_b, C]`` float32 (pooled in float32 whatever the map's dtype), image by image.
    """
    if sum(len(b) for b in boxes) == 0:
        return features.new_zeros((0, features.shape[1]), dtype=torch.float32)
    scale = features.shape[-1] / image_size
    rois = [b.to(device=features.device, dtype=torch.float32) for b in boxes]
    pooled = roi_align(features.float(), rois, output_size, spatial_scale=scale, sampling_ratio=2, aligned=True)
    return pooled.mean(dim=(2, 3))


class ObjectProjector(nn.Module):
    """LLaVA-1.5-style 2-layer GELU MLP from high-res feature width ``C`` to the LLM width (``mg_``-prefixed names)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mg_obj_fc1 = nn.Linear(in_dim, out_dim)
        self.mg_obj_fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: ``Tensor[K, C]`` -> ``Tensor[K, out_dim]``."""
        x = pooled.to(self.mg_obj_fc1.weight.dtype)
        return self.mg_obj_fc2(F.gelu(self.mg_obj_fc1(x)))
