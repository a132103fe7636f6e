"""Preprocessed images kept across epochs (``grounding_image_cache``).

The host's collator decodes, resizes and patchifies every image of every batch
(``template.mm_plugin.get_mm_inputs`` -> ``_get_mm_inputs``), in every epoch, although an image file gives the same
``pixel_values`` every time under the same processor settings. :class:`ImageTensorCache` keeps, per image file, the
rows of ``pixel_values`` and the ``image_grid_thw`` row the host's own preprocessing produced for it, and serves them
again while the file and the settings are unchanged; the batch is the concatenation of its images' entries in order,
which is what the image processor returns for the batch (each image is patchified on its own; proven equal with
``torch.equal`` on the collated batches in tests/test_image_cache.py). A still image's patches repeat the frame
``temporal_patch_size`` times; one copy is stored (half the memory) and the rows are rebuilt exactly on use.

The cache lives in one process: with ``dataloader_num_workers > 0`` each worker holds its own (up to the byte limit
each), and only persistent workers keep it from one epoch to the next.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from typing_extensions import override

from llamafactory_vision.image_header import FileVersion, file_version

MIB = 1 << 20
_OUTPUT_KEYS = frozenset(("pixel_values", "image_grid_thw"))


@dataclass
class CacheCounts:
    """What the cache did, per image looked up (one process)."""

    hits: int = 0  # served from the cache (or from an earlier image of the same batch with the same key)
    misses: int = 0  # a file image preprocessed, then stored (unless larger than the whole limit)
    uncached: int = 0  # not a file path (bytes, PIL image, file object): preprocessed every time, never stored
    evictions: int = 0  # entries dropped to stay under the byte limit


def processor_settings(processor) -> tuple:
    """What decides an image's tensors besides its file: the host's pixel limits (applied before the HF processor)
    and every setting of the image processor (resize limits, patch/merge sizes, mean/std, resampling...)."""
    image_processor = processor.image_processor
    return (
        getattr(processor, "image_max_pixels", 768 * 768),  # the host's defaults when unset (mm_plugin._get_mm_inputs)
        getattr(processor, "image_min_pixels", 32 * 32),
        type(image_processor).__qualname__,
        json.dumps(image_processor.to_dict(), sort_keys=True, default=str),
    )


def file_key(image) -> FileVersion | None:
    """:func:`~llamafactory_vision.image_header.file_version` of an image given as a path or ``{"path": ...}`` without
    bytes, under its resolved path (a symlink reaches its target's entry); ``None`` for inputs that are not a file on
    disk (bytes, PIL images, file objects)."""
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image.get("path")
    if not isinstance(image, (str, os.PathLike)):
        return None
    return file_version(os.path.realpath(image))


@dataclass(frozen=True)
class _Entry:
    """One image's tensors as stored. A still image's ``pixel_values`` row holds each patch as ``(channel, temporal,
    patch, patch)`` with the frame repeated ``temporal_patch_size`` times (the processor tiles it to fill a temporal
    patch); then only one copy is kept (``repeat`` > 1) and the rows are rebuilt on use, exactly.

    pixels: FloatTensor[N, D] (``repeat`` 1) or FloatTensor[N, C, 1, P*P] (one temporal copy); grid: LongTensor[1, 3].
    """

    pixels: torch.Tensor
    grid: torch.Tensor
    repeat: int

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size() + self.grid.numel() * self.grid.element_size()

    @property
    def num_rows(self) -> int:
        return self.pixels.shape[0]

    @property
    def rows_width(self) -> int:
        """D: the width of a ``pixel_values`` row (channel x temporal x patch x patch)."""
        return self.pixels[0].numel() * self.repeat

    def rows(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """FloatTensor[N, D]: the image's ``pixel_values`` rows as the processor returned them, written into ``out``
        (FloatTensor[N, D]) when given (one copy, however they are stored)."""
        if self.repeat == 1:
            return self.pixels.clone() if out is None else out.copy_(self.pixels)
        n, channels, _, area = self.pixels.shape
        if out is None:
            out = self.pixels.new_empty(n, channels * self.repeat * area)
        out.view(n, channels, self.repeat, area).copy_(self.pixels.expand(n, channels, self.repeat, area))
        return out

    @classmethod
    def of(cls, rows: torch.Tensor, grid: torch.Tensor, temporal: int, patch: int) -> _Entry:
        """The entry of one image's ``rows`` (FloatTensor[N, D]), with one temporal copy when all are equal."""
        n, dim = rows.shape
        if temporal > 1 and dim % (temporal * patch * patch) == 0:
            frames = rows.reshape(n, dim // (temporal * patch * patch), temporal, patch * patch)
            if torch.equal(frames, frames[:, :, :1].expand_as(frames)):
                return cls(frames[:, :, :1].contiguous(), grid.clone(), temporal)
        return cls(rows.clone(), grid.clone(), 1)


class ImageTensorCache:
    """Least-recently-used cache of one process: file version + processor settings -> ``(pixel_values rows,
    image_grid_thw row)``, bounded by the bytes of the stored tensors.

    Args:
        max_bytes (int): the most bytes the stored tensors may take; the least recently used entries are dropped to
            stay under it, and an image larger than the whole limit is preprocessed every time.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the image cache needs a positive byte limit, got {max_bytes}.")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.counts = CacheCounts()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def mm_inputs(self, images: list, processor, preprocess: Callable[[list], dict]) -> dict[str, torch.Tensor]:
        """``pixel_values`` and ``image_grid_thw`` of ``images``, as ``preprocess(images)`` returns them.

        Args:
            images (list): image inputs as LLaMA-Factory accepts them (path, bytes, {"path"|"bytes"}, PIL).
            processor: the multimodal processor ``preprocess`` uses (its settings are part of each key).
            preprocess (Callable): the host's preprocessing of a list of images, returning ``pixel_values``
                (FloatTensor[sum of t*h*w over the images, patch_dim]) and ``image_grid_thw`` (LongTensor[N, 3]).

        Returns:
            dict: ``pixel_values`` FloatTensor[sum_i t_i*h_i*w_i, patch_dim] and ``image_grid_thw`` LongTensor[N, 3],
            the images' entries concatenated in order (new tensors: the cache's own are never handed out).
        """
        settings = processor_settings(processor)
        image_processor = processor.image_processor
        layout = (getattr(image_processor, "temporal_patch_size", 1), image_processor.patch_size)
        keys = [None if (key := file_key(image)) is None else (*key, settings) for image in images]
        found: dict[int, _Entry] = {}
        todo: list[int] = []  # indices to preprocess: unkeyed images and the first image of each missing key
        first_of: dict[tuple, int] = {}
        for index, key in enumerate(keys):
            if key is None:
                self.counts.uncached += 1
                todo.append(index)
            elif key in self._entries:
                self._entries.move_to_end(key)
                found[index] = self._entries[key]
                self.counts.hits += 1
            elif key in first_of:  # the same file twice in one batch: preprocessed once
                self.counts.hits += 1
            else:
                self.counts.misses += 1
                first_of[key] = index
                todo.append(index)
        if todo:
            entries = _split_per_image(preprocess([images[i] for i in todo]), *layout)
            for index, entry in zip(todo, entries, strict=True):
                found[index] = entry
                if keys[index] is not None:
                    self._store(keys[index], entry)
        for index, key in enumerate(keys):
            if index not in found:
                found[index] = found[first_of[key]]
        entries = [found[i] for i in range(len(images))]
        pixels = entries[0].pixels.new_empty(sum(e.num_rows for e in entries), entries[0].rows_width)
        start = 0
        for entry in entries:
            entry.rows(out=pixels[start : start + entry.num_rows])
            start += entry.num_rows
        return {"pixel_values": pixels, "image_grid_thw": torch.cat([e.grid for e in entries])}

    def _store(self, key: tuple, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.counts.evictions += 1


def _split_per_image(mm_inputs: dict, temporal: int, patch: int) -> list[_Entry]:
    """Cut a Qwen-VL image batch into one :class:`_Entry` per image (own memory, so that an entry does not keep its
    whole batch alive): image ``i`` owns ``t_i * h_i * w_i`` consecutive rows of ``pixel_values``."""
    if set(mm_inputs) != _OUTPUT_KEYS:
        raise ValueError(
            f"grounding_image_cache: the image processor returned {sorted(mm_inputs)}, but the cache only knows how to "
            f"split {sorted(_OUTPUT_KEYS)} per image. Set `grounding_image_cache: false`."
        )
    grid = mm_inputs["image_grid_thw"]
    pixels = mm_inputs["pixel_values"]
    rows = grid.prod(dim=-1).tolist()
    if sum(rows) != pixels.shape[0]:
        raise ValueError(f"grounding_image_cache: {pixels.shape[0]} pixel rows for image grids {grid.tolist()}.")
    return [_Entry.of(p, g, temporal, patch) for p, g in zip(pixels.split(rows), grid.split(1), strict=True)]


@dataclass
class ImageCacheMixin:
    """A Qwen-VL plugin whose ``_get_mm_inputs`` serves still images from :attr:`image_cache` when one is set (videos
    and audio keep the host's path)."""

    image_cache: ImageTensorCache | None = field(default=None, compare=False, repr=False)

    @override
    def _get_mm_inputs(self, images, videos, audios, processor):
        if self.image_cache is None or videos or audios or not images:
            return super()._get_mm_inputs(images, videos, audios, processor)
        host = super()._get_mm_inputs
        return self.image_cache.mm_inputs(images, processor, lambda batch: host(batch, [], [], processor))


def with_image_cache(template, enabled: bool, limit_mib: float):
    """``template`` itself, or (``enabled`` and a caching plugin) a copy whose plugin copy holds a new
    :class:`ImageTensorCache` of ``limit_mib`` MiB. A copy: the registered template and its plugin stay untouched."""
    if not enabled or not isinstance(template.mm_plugin, ImageCacheMixin):
        return template
    cache = ImageTensorCache(int(limit_mib * MIB))
    return dataclasses.replace(template, mm_plugin=dataclasses.replace(template.mm_plugin, image_cache=cache))


def validate_image_cache(data_args, training_args, is_grounding_template: bool) -> None:
    """Refuse ``grounding_image_cache: true`` where it could never serve anything: a template that is not a
    grounding one, or dataloader workers that are started afresh (with an empty cache) every epoch."""
    if not getattr(data_args, "grounding_image_cache", False):
        return
    if not is_grounding_template:
        raise ValueError(
            f"`grounding_image_cache: true` needs a grounding template (qwen2_vl_ground, qwen2_5_vl_ground, "
            f"qwen3_vl_ground), got template {data_args.template!r}."
        )
    workers = 0 if training_args is None else training_args.dataloader_num_workers
    if workers > 0 and not training_args.dataloader_persistent_workers:
        raise ValueError(
            f"`grounding_image_cache: true` with `dataloader_num_workers: {workers}` needs "
            "`dataloader_persistent_workers: true`: each worker caches in its own memory, and workers started afresh "
            "every epoch would start with an empty cache every epoch."
        )
