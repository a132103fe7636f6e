"""The ``llava_strokes`` multimodal plugin: LLaVA-1.5's ``expand2square`` before the CLIP processor.

The llava-hf processor resizes the short side and centre-crops, which would cut off sketches near the long sides;
LLaVA-1.5 (and MagicQuill's model) pad to a square with the processor's mean colour first. ``_get_mm_inputs`` is
where every data processor, the collator and the chat engine turn images into pixels, and it is the only method
that sees the processor (for the mean colour), so the padding lives there: train, predict and chat see one image.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamafactory.data.mm_plugin import LlavaPlugin
from typing_extensions import override

from llamafactory_vision.strokes.render import expand2square, mean_colour


@dataclass
class StrokeLlavaPlugin(LlavaPlugin):
    @override
    def _get_mm_inputs(self, images, videos, audios, processor, imglens=None):
        if images:
            fill = mean_colour(processor.image_processor.image_mean)
            # The host's reader (paths, bytes, dicts, PIL -> RGB) with no resize; its resize runs after padding.
            opened = self._regularize_images(images, image_max_pixels=sys.maxsize, image_min_pixels=0)["images"]
            images = [expand2square(image, fill) for image in opened]
        return super()._get_mm_inputs(images, videos, audios, processor, imglens)


STROKE_PLUGINS = {"llava_strokes": StrokeLlavaPlugin}
