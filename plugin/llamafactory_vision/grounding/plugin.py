"""Grounding multimodal plugins: the host's Qwen-VL plugins, plus box markers rendered at the final image size.

``process_messages`` is the one host method that every data processor (supervised, unsupervised/predict, pairwise,
feedback) and the chat engine call with the images at hand, before ``<image>`` is expanded. There the size each image
will have inside the model is known, so boxes are written in the family's coordinates exactly once.

Fast tokenization (``grounding_fast_tokenize``): to expand ``<image>`` the host needs only each image's token grid,
but gets it by decoding, resizing and patchifying every image (``Qwen2VLPlugin._get_mm_token_metadata`` ->
``_get_mm_inputs``), and the collator does all of it again for the batch. The grid follows from the header size by
the same arithmetic (:func:`llamafactory_vision.boxes.model_view_size`, proven equal to the host pipeline in
tests/test_resize.py), so the fast plugin reads headers only. The collator still decodes the images it batches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from io import BytesIO

import torch
from llamafactory.data.mm_plugin import Qwen2VLPlugin, Qwen3VLPlugin
from PIL import Image
from typing_extensions import override

from llamafactory_vision.boxes import model_view_size
from llamafactory_vision.grounding.formats import get_codec
from llamafactory_vision.grounding.image_cache import ImageCacheMixin
from llamafactory_vision.grounding.markers import has_markers, render_markers


def original_size(image) -> tuple[int, int]:
    """(width, height) of an image input as LLaMA-Factory accepts it (path, bytes, {"path"|"bytes"} or PIL),
    read from the header only (once per file version: see :func:`_file_header_size`)."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, bytes):
        image = BytesIO(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        stat = os.stat(path)
        return _file_header_size(path, stat.st_mtime_ns, stat.st_size)
    with Image.open(image) as opened:  # a file object
        return opened.size


@functools.lru_cache(maxsize=65536)
def _file_header_size(path: str, mtime_ns: int, file_size: int) -> tuple[int, int]:
    """(width, height) from the header of the file at ``path`` as it was at ``(mtime_ns, file_size)``.

    Tokenizing one grounding row asks for its image's size twice (box rendering in ``process_messages``, then the
    token grid in ``_get_mm_token_metadata``), and every epoch of a cached dataset again; a header read costs far more
    than the ``os.stat`` that keys this memo, and a file rewritten since has another key, so it is read afresh.
    """
    with Image.open(path) as opened:
        return opened.size


def image_grid_thw(images: list, processor) -> torch.Tensor:
    """Token grid of each image as the host's Qwen-VL pipeline would produce it, from image headers only.

    Args:
        images (list): image inputs as LLaMA-Factory accepts them (path, bytes, {"path"|"bytes"} or PIL).
        processor: the Qwen-VL multimodal processor (with ``image_processor`` and the host's pixel limits).

    Returns:
        LongTensor[N, 3]: ``(t, h, w)`` per image in patches, ``t = 1`` (a still image fills one temporal patch);
        equals the ``image_grid_thw`` the image processor returns for the same images.
    """
    patch_size = processor.image_processor.patch_size
    rows = []
    for image in images:
        width, height = model_view_size(*original_size(image), processor)
        rows.append((1, height // patch_size, width // patch_size))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 3)


class GroundingPluginMixin:
    """Renders box markers with the codec of ``box_family`` before the host plugin expands image tokens; with
    ``fast_tokenize``, counts image tokens from image headers instead of preprocessing the images."""

    box_family: str
    fast_tokenize: bool

    @override
    def _get_mm_token_metadata(self, images, videos, audios, processor):
        # Only still images have a header-only path; videos and audio keep the host's own.
        if not self.fast_tokenize or videos or audios:
            return super()._get_mm_token_metadata(images, videos, audios, processor)
        return {"image_grid_thw": image_grid_thw(images, processor)}

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
class GroundingQwen2VLPlugin(GroundingPluginMixin, ImageCacheMixin, Qwen2VLPlugin):
    box_family: str = "qwen2_vl"
    fast_tokenize: bool = False


@dataclass
class GroundingQwen3VLPlugin(GroundingPluginMixin, ImageCacheMixin, Qwen3VLPlugin):
    box_family: str = "qwen3_vl"
    fast_tokenize: bool = False


GROUNDING_PLUGINS = {
    "qwen2_vl_ground": GroundingQwen2VLPlugin,
    "qwen3_vl_ground": GroundingQwen3VLPlugin,
}


def with_fast_tokenize(template, enabled: bool):
    """``template`` itself, or (``enabled`` and a grounding plugin) a copy whose plugin copy has ``fast_tokenize``.

    A copy, not a flag on the registered template: run settings stay out of the host's global ``TEMPLATES``.
    """
    if not enabled or not isinstance(template.mm_plugin, GroundingPluginMixin):
        return template
    return dataclasses.replace(template, mm_plugin=dataclasses.replace(template.mm_plugin, fast_tokenize=True))
