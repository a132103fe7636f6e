"""Grounding multimodal plugins: the host's Qwen-VL plugins, plus box markers rendered at the final image size.

``process_messages`` is the one host method that every data processor (supervised, unsupervised/predict, pairwise,
feedback) and the chat engine call with the images at hand, before ``<image>`` is expanded. There the size each image
will have inside the model is known, so boxes are written in the family's coordinates exactly once.

Fast tokenization (``grounding_fast_tokenize``): to expand ``<image>`` the host needs only each image's token grid,
but gets it by decoding, resizing and patchifying every image (``Qwen2VLPlugin._get_mm_token_metadata`` ->
``_get_mm_inputs``), and the collator does all of it again for the batch. The grid follows from the header size by
the same arithmetic (:func:`llamafactory_vision.boxes.model_view_size`, proven equal to the host pipeline in
tests/test_resize.py), so the fast plugin reads headers only. The collator still decodes the images it batches. The
fast template copy also writes each image's run of image tokens as ids instead of tokenizing it (see image_runs.py).
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
from llamafactory_vision.grounding.image_runs import image_run_template_class
from llamafactory_vision.grounding.markers import has_markers, render_markers
from llamafactory_vision.image_header import FileVersion, file_version, image_size


def original_size(image) -> tuple[int, int]:
    """(width, height) of an image input as LLaMA-Factory accepts it (path, bytes, {"path"|"bytes"} or PIL),
    read from the header only (once per file version: see :func:`file_header_size`)."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, bytes):
        image = BytesIO(image)
    if isinstance(image, (str, os.PathLike)):
        return file_header_size(os.fspath(image))
    with Image.open(image) as opened:  # a file object
        return opened.size


_HEADER_SIZES: dict[FileVersion, tuple[int, int]] = {}
_HEADER_SIZES_KEPT = 65536


def file_header_size(path: str) -> tuple[int, int]:
    """(width, height) from the header of the file at ``path`` (:func:`~llamafactory_vision.image_header.image_size`),
    read once per file version.

    Preparing one grounding row asks for its image's size three times (the converter's check, box rendering in
    ``process_messages``, the token grid in ``_get_mm_token_metadata``), and every epoch of a cached dataset again; a
    header read costs far more than the ``os.stat`` that keys this memo, and a file rewritten since has another key,
    so it is read afresh. (``llamafactory-vision convert`` reads each image once and has no use for the memo.)
    """
    version = file_version(path)
    size = _HEADER_SIZES.get(version)
    if size is None:
        size = image_size(path)
        remember_header_size(version, size)
    return size


def remember_header_size(version: FileVersion, size: tuple[int, int]) -> None:
    """Record ``size``, read from the header of the file at ``version`` by a caller that opened it anyway (the
    converter, which verifies every image); the oldest entry goes once the memo holds ``_HEADER_SIZES_KEPT``."""
    if len(_HEADER_SIZES) >= _HEADER_SIZES_KEPT:
        del _HEADER_SIZES[next(iter(_HEADER_SIZES))]
    _HEADER_SIZES[version] = size


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
    """``template`` itself, or (``enabled`` and a grounding plugin) a copy whose plugin copy has ``fast_tokenize`` and
    whose class writes image-token runs as ids (:class:`~llamafactory_vision.grounding.image_runs.ImageRunEncoding`).

    A copy, not a flag on the registered template: run settings stay out of the host's global ``TEMPLATES``.
    """
    if not enabled or not isinstance(template.mm_plugin, GroundingPluginMixin):
        return template
    fields = {field.name: getattr(template, field.name) for field in dataclasses.fields(template) if field.init}
    fields["mm_plugin"] = dataclasses.replace(template.mm_plugin, fast_tokenize=True)
    return image_run_template_class(type(template))(**fields)
