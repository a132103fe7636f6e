"""Edit metrics (MagicBrush / MGIE protocol): L1, L2, CLIP-I, CLIP-T, DINO.

- ``l1``/``l2``: mean absolute / squared difference of RGB values in [0, 1], after resizing the output to the target's
  size (bicubic).
- ``clip_i``: cosine of the CLIP image embeddings of output and target; ``dino``: cosine of DINO's CLS features.
- ``clip_t``: 100 * cosine of the output image and ``target_caption`` CLIP embeddings, averaged over rows that have a
  caption (``clip_t_n`` counts them). Unlike torchmetrics' ``CLIPScore`` it is not clamped at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pixel_errors(output: Image.Image, target: Image.Image) -> tuple[float, float]:
    """(L1, L2) of one pair: ``output`` resized to ``target.size`` (bicubic), RGB in [0, 1], mean over pixels and
    channels."""
    out = np.asarray(output.convert("RGB").resize(target.size, Image.Resampling.BICUBIC), dtype=np.float64) / 255
    tgt = np.asarray(target.convert("RGB"), dtype=np.float64) / 255
    diff = out - tgt
    return float(np.abs(diff).mean()), float((diff**2).mean())


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _pooled(features) -> torch.Tensor:
    """transformers 5.x returns an output object from ``get_*_features`` (projected embedding in ``pooler_output``);
    4.x returned the tensor itself."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipScorer:
    """CLIP image/text embeddings from a local ``CLIPModel`` folder (ViT-B/32 in the published protocol)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``Tensor[N, D]``, unit norm."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        return _unit(_pooled(self.model.get_image_features(**inputs)).float())

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """``Tensor[N, D]``, unit norm (texts truncated to CLIP's context)."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        return _unit(_pooled(self.model.get_text_features(**inputs)).float())


class DinoScorer:
    """CLS features of a local DINO ViT folder (ViT-S/16 in the published protocol)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        return _unit(self.model(**inputs).last_hidden_state[:, 0].float())


def edit_metrics(
    outputs: Sequence[Image.Image],
    targets: Sequence[Image.Image],
    captions: Sequence[str | None],
    clip: ClipScorer | None = None,
    dino: DinoScorer | None = None,
) -> dict[str, float | int]:
    """Mean metrics over aligned rows (see the module docstring). ``captions[i]`` None or "" = no caption."""
    if not len(outputs) == len(targets) == len(captions):
        raise ValueError(f"misaligned rows: {len(outputs)} outputs, {len(targets)} targets, {len(captions)} captions.")
    if not outputs:
        raise ValueError("no rows to score.")
    errors = np.array([pixel_errors(o, t) for o, t in zip(outputs, targets)])
    result: dict[str, float | int] = {"n": len(outputs), "l1": float(errors[:, 0].mean()), "l2": float(errors[:, 1].mean())}
    if clip is not None:
        out_embeds = clip.image_embeds(outputs)
        result["clip_i"] = float((out_embeds * clip.image_embeds(targets)).sum(-1).mean())
        rows = [i for i, caption in enumerate(captions) if caption]
        result["clip_t_n"] = len(rows)
        if rows:
            text = clip.text_embeds([captions[i] for i in rows])
            result["clip_t"] = float(100 * (out_embeds[rows] * text).sum(-1).mean())
    if dino is not None:
        result["dino"] = float((dino.embeds(outputs) * dino.embeds(targets)).sum(-1).mean())
    return result
