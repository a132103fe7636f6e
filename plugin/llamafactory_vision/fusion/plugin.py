"""The ``llava_mg`` multimodal plugin: square images for both branches, the high-res tensor and object boxes.

Every data processor, the collator and the chat engine go through ``process_messages`` (token expansion) and
``_get_mm_inputs`` (pixels), so train, predict and chat see the same inputs:

- both branches see the image padded to a square with the processor's mean colour (LLaVA-1.5's ``expand2square``),
  so CLIP token ``(i, j)`` and high-res feature cell ``(i, j)`` cover the same part of the picture (the stock llava
  processor centre-crops, which would misalign the fusion);
- ``mg_pixel_values``: the square resized to ``mg_hr_image_size`` (bicubic), normalised with the processor's
  mean/std (the CLIP statistics, which CLIP-ConvNeXt shares);
- ``mg_boxes``: per image ``Tensor[K, 4]`` xyxy in pixels of that high-res square, from the boxes the ``mg_llava``
  converter put beside the image path (normalised to the original image);
- each ``<image>`` is followed by ``K`` more image tokens: the object tokens the model appends after the image's.
"""

from __future__ import annotations

import json
import sys
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from llamafactory.data.mm_plugin import LlavaPlugin
from llamafactory.extras.constants import IMAGE_PLACEHOLDER
from PIL import Image
from typing_extensions import override

from llamafactory_vision.fusion.templates import BOXES_KEY
from llamafactory_vision.strokes.render import expand2square, mean_colour

_OBJECT_MARK = "<|lfv_mg_object|>"  # stands for one object token between the host's expansion and ours


def image_boxes(image) -> list[list[float]]:
    """The normalised ``xyxy`` boxes carried by an image entry (none for plain paths, PIL images, chat inputs)."""
    if isinstance(image, dict) and image.get(BOXES_KEY):
        return json.loads(image[BOXES_KEY])
    return []


def square_pixel_boxes(boxes: list[list[float]], size: tuple[int, int], side: int) -> torch.Tensor:
    """Map boxes normalised to an original ``(W, H)`` image into pixels of its ``expand2square`` version resized to
    ``side`` x ``side``: ``S = max(W, H)``, offsets ``((S - W) // 2, (S - H) // 2)``, then scale ``side / S``.

    Returns ``Tensor[K, 4]`` float32 xyxy (pixel edges).
    """
    width, height = size
    square = max(width, height)
    dx, dy = (square - width) // 2, (square - height) // 2
    scale = side / square
    rows = [[(x1 * width + dx) * scale, (y1 * height + dy) * scale, (x2 * width + dx) * scale,
             (y2 * height + dy) * scale] for x1, y1, x2, y2 in boxes]  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def normalise(image: Image.Image, side: int, mean, std) -> np.ndarray:
    """``(3, side, side)`` float32: bicubic resize, [0, 1], then ``(x - mean) / std`` per channel."""
    pixels = np.asarray(image.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


@dataclass
class MGLlavaPlugin(LlavaPlugin):
    @override
    def process_messages(self, messages, images, videos, audios, processor):
        if not self.expand_mm_tokens:
            raise ValueError("template `llava_mg` needs expanded image tokens (object tokens follow each image).")
        counts = iter([len(image_boxes(image)) for image in images])
        marked = deepcopy(messages)
        for message in marked:
            parts = message["content"].split(IMAGE_PLACEHOLDER)
            message["content"] = parts[0] + "".join(
                IMAGE_PLACEHOLDER + _OBJECT_MARK * next(counts, 0) + part for part in parts[1:]
            )
        expanded = super().process_messages(marked, images, videos, audios, processor)
        for message in expanded:
            message["content"] = message["content"].replace(_OBJECT_MARK, self.image_token)
        return expanded

    @override
    def _get_mm_inputs(self, images, videos, audios, processor, imglens=None):
        if not images:
            return super()._get_mm_inputs(images, videos, audios, processor, imglens)
        side = getattr(processor, "mg_hr_image_size", None)
        if side is None:
            raise ValueError("template `llava_mg` needs `mg_hr_vision_tower` (MG-LLaVA) in the model arguments.")
        image_processor = processor.image_processor
        opened = self._regularize_images(images, image_max_pixels=sys.maxsize, image_min_pixels=0)["images"]
        squares = [expand2square(image, mean_colour(image_processor.image_mean)) for image in opened]
        mm_inputs = super()._get_mm_inputs(squares, videos, audios, processor, imglens)
        hr = [normalise(s, side, image_processor.image_mean, image_processor.image_std) for s in squares]
        mm_inputs["mg_pixel_values"] = torch.from_numpy(np.stack(hr))
        mm_inputs[BOXES_KEY] = [square_pixel_boxes(image_boxes(raw), im.size, side) for raw, im in zip(images, opened)]
        return mm_inputs


MG_PLUGINS = {"llava_mg": MGLlavaPlugin}
