"""Grounding multimodal plugins: the host's Qwen-VL plugins, plus box markers rendered at the final image size.

``process_messages`` is the one host method that every data processor (supervised, unsupervised/predict, pairwise,
feedback) and the chat engine call with the images at hand, before ``<image>`` is expanded. There the size each image
will have inside the model is known, so boxes are written in the family's coordinates exactly once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from io import BytesIO

from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin
from PIL import Image
from typing_extensions import override

from llamafactory_vision.boxes import model_view_size
from llamafactory_vision.grounding.formats import get_codec
from llamafactory_vision.grounding.markers import has_markers, render_markers


def original_size(image) -> tuple[int, int]:
    """(width, height) of an image input as LLaMA-Factory accepts it (path, bytes, {"path"|"bytes"} or PIL),
    read from the header only."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, bytes):
        image = BytesIO(image)
    with Image.open(image) as opened:
        return opened.size


class GroundingPluginMixin:
    """Renders box markers with the codec of ``box_family`` before the host plugin expands image tokens."""

    box_family: str

    @override
    def process_messages(self, messages, images, videos, audios, processor):
        if any(has_markers(message["content"]) for message in messages):
            codec = get_codec(self.box_family)

            @functools.cache  # a row's region and answer markers share one header read
            def model_size(index: int) -> tuple[int, int]:
                if index >= len(images):
                    raise ValueError(f"a box refers to image {index}, but the row has {len(images)} image(s).")
                return model_view_size(*original_size(images[index]), processor)

            messages = [{**m, "content": render_markers(m["content"], codec, model_size)} for m in messages]
        return super().process_messages(messages, images, videos, audios, processor)


@dataclass
class GroundingQwen2VLPlugin(GroundingPluginMixin, Qwen2VLPlugin):
    box_family: str = "qwen2_vl"


@dataclass
class GroundingQwen3VLPlugin(GroundingPluginMixin, Qwen3VLPlugin):
    box_family: str = "qwen3_vl"


GROUNDING_PLUGINS = {
    "qwen2_vl_ground": GroundingQwen2VLPlugin,
    "qwen3_vl_ground": GroundingQwen3VLPlugin,
}
