"""The ``grounding`` dataset format: rows of one image and pixel boxes, turned into LLaMA-Factory's aligned format.

A row (column names mappable through ``columns`` in dataset_info.json, as for any LLaMA-Factory dataset)::

    {"images": ["img.jpg"],                      # or "image": "img.jpg"; exactly one image
     "objects": [{"ref": "red car", "bbox": [x1, y1, x2, y2]}, ...],
     "bbox_format": "xyxy",                      # optional: xyxy (default) | xywh (COCO, RefCOCO) | cxcywh
     "task": "rec",                              # optional: rec (phrase -> box, default) | reg | detect
     "prompt": "..."}                            # optional: overrides the template's phrasing; may use {ref}/{region}

Boxes are pixels of the original image. They are validated here, where data enters (never clamped), normalised to
[0, 1] and written as neutral markers (see markers.py) that the grounding plugin renders at the final image size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from llamafactory.data.converter import DatasetConverter
from llamafactory.extras.constants import IMAGE_PLACEHOLDER
from PIL import Image, UnidentifiedImageError

from llamafactory_vision.boxes import BoxError, normalize_xyxy, validate_pixel_box
from llamafactory_vision.dataset_rows import SKIP_COLUMN, RowError, align_with_row_checks
from llamafactory_vision.grounding.formats import GroundedObject
from llamafactory_vision.grounding.markers import objects_marker, region_marker
from llamafactory_vision.grounding.plugin import remember_header_size
from llamafactory_vision.grounding.templates import TASKS, get_grounding_spec, load_grounding_specs
from llamafactory_vision.image_header import file_version, verified_size
from llamafactory_vision.log import get_logger

logger = get_logger(__name__)


class GroundingDataError(RowError):
    """An invalid grounding row (also raised for the formats whose converters build on the grounding one, with their
    own ``kind``)."""

    kind = "grounding"


@dataclass
class GroundingDatasetConverter(DatasetConverter):
    """Converts one grounding row into ``_prompt``/``_response``/``_images`` with box markers."""

    kind = "grounding"  # the formatting name, in error messages

    def __post_init__(self):
        self.spec = get_grounding_spec(self.data_args.template)
        if self.spec is None:
            raise ValueError(
                f"dataset {self.dataset_attr.dataset_name!r} has formatting `grounding`, which needs a grounding "
                f"template ({', '.join(load_grounding_specs())}); got template {self.data_args.template!r}."
            )

    def _fail(self, row: int | None, field: str, message: str, reason: str) -> GroundingDataError:
        return GroundingDataError(self.dataset_attr.dataset_name, row, field, message, reason, self.kind)

    def _column(self, example: dict[str, Any], name: str | None) -> Any:
        return example.get(name) if name else None

    def _image_path(self, example: dict[str, Any], row: int | None) -> tuple[str, tuple[int, int]]:
        images = self._column(example, self.dataset_attr.images)
        field = self.dataset_attr.images
        if images is None:
            images, field = self._column(example, self.dataset_attr.image), self.dataset_attr.image
        if isinstance(images, str):
            images = [images]
        if not images:
            raise self._fail(row, field or "images", "no image given", "missing_image")
        if len(images) != 1:
            raise self._fail(row, field, f"a grounding row takes exactly one image, got {len(images)}", "image_count")
        (path,) = self._find_medias(images)
        if not isinstance(path, str) or not os.path.isfile(path):
            raise self._fail(row, field, f"image file not found: {self._searched(images[0])}", "missing_image")
        version = file_version(path)  # before opening: a file rewritten meanwhile gets another key
        # PIL's open + verify(), without PIL where the file is a well-formed PNG or JPEG (the same sizes, the same
        # files refused: anything else is PIL's to decide and name); part of the fast path its switch turns off
        size = verified_size(path) if getattr(self.data_args, "grounding_fast_tokenize", False) else None
        if size is None:
            try:
                with Image.open(path) as image:
                    size = image.size
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as err:
                raise self._fail(row, field, f"cannot read image {path!r}: {err}", "corrupt_image") from err
        remember_header_size(version, size)  # the plugin asks for this size again at tokenization
        return path, size

    def _searched(self, image: Any) -> str:
        """Where the host's ``_find_medias`` looked for ``image``, for the missing-image message."""
        if not isinstance(image, str):
            return repr(image)
        places = [f"{os.path.abspath(image)!r} (from the working directory)"]
        if self.dataset_attr.load_from in ("script", "file"):  # the only sources the host joins to media_dir
            media_dir = self.data_args.media_dir
            origin = "`media_dir`" if media_dir != self.data_args.dataset_dir else "`dataset_dir` (no `media_dir` set)"
            places.insert(0, f"{os.path.abspath(os.path.join(media_dir, image))!r} (in {origin} {media_dir!r})")
        return f"{image!r}; searched {' and '.join(places)}"

    def _objects(self, example: dict[str, Any], row: int | None, size: tuple[int, int]) -> list[GroundedObject]:
        field = self.dataset_attr.objects
        objects = self._column(example, field)
        if not isinstance(objects, list) or len(objects) == 0:
            raise self._fail(row, field, f"expected a non-empty list of objects, got {objects!r}", "no_objects")
        bbox_format = self._column(example, self.dataset_attr.bbox_format) or "xyxy"
        result = []
        for i, obj in enumerate(objects):
            if not isinstance(obj, dict):
                raise self._fail(row, f"{field}[{i}]", f"expected {{'ref', 'bbox'}}, got {obj!r}", "bad_object")
            ref = obj.get("ref")
            if not isinstance(ref, str) or not ref.strip():
                raise self._fail(row, f"{field}[{i}].ref", f"expected a non-empty string, got {ref!r}", "bad_ref")
            try:
                xyxy = validate_pixel_box(obj.get("bbox"), bbox_format, size)
            except BoxError as err:
                field_name = self.dataset_attr.bbox_format if err.reason == "unknown_format" else f"{field}[{i}].bbox"
                raise self._fail(row, field_name, str(err), err.reason) from err
            result.append(GroundedObject(ref=ref.strip(), box=normalize_xyxy(xyxy, size)))
        return result

    def _messages(self, example: dict[str, Any], row: int | None, path: str, objects: list[GroundedObject]):
        task = self._column(example, self.dataset_attr.task) or "rec"
        if task not in TASKS:
            raise self._fail(row, self.dataset_attr.task, f"unknown task {task!r}; use one of {TASKS}", "unknown_task")
        refs = list(dict.fromkeys(o.ref for o in objects))
        if task == "reg":
            if len(objects) != 1:
                raise self._fail(
                    row, self.dataset_attr.objects, f"task `reg` takes exactly one object, got {len(objects)}",
                    "reg_object_count",
                )
            region, answer = region_marker(0, objects[0].box), objects[0].ref
        else:
            region, answer = "", objects_marker(0, objects, self.data_args.ground_answer_style)
        ref_text = " and ".join(refs)
        prompt = self._column(example, self.dataset_attr.grounding_prompt)
        if not prompt:
            # The file name, not the resolved path: the same row gets the same wording wherever the dataset lies.
            prompt = self.spec.pick_prompt(task, f"{os.path.basename(path)}|{ref_text}|{task}")
        prompt = prompt.replace("{ref}", ref_text).replace("{region}", region)
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER + prompt
        return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]

    def convert(self, example: dict[str, Any], row: int | None) -> dict[str, Any]:
        """Aligned output for one row; raises :class:`GroundingDataError` on invalid input."""
        path, size = self._image_path(example, row)
        objects = self._objects(example, row, size)
        prompt, response = self._messages(example, row, path, objects)
        return {
            "_prompt": prompt,
            "_response": response,
            "_system": "",
            "_tools": "",
            "_images": [path],
            "_videos": None,
            "_audios": None,
        }

    def __call__(self, example: dict[str, Any], row: int | None = None) -> dict[str, Any]:
        try:
            return {**self.convert(example, row), SKIP_COLUMN: ""}
        except GroundingDataError as err:
            if self.data_args.grounding_invalid == "error":
                raise
            logger.info_rank0(f"skipping: {err}")
            empty = {"_prompt": [], "_response": [], "_system": "", "_tools": "", "_images": None}
            return {**empty, "_videos": None, "_audios": None, SKIP_COLUMN: err.reason}


def align_grounding_dataset(dataset, dataset_attr, data_args, training_args):
    """``align_dataset`` for ``formatting: grounding``, ``stroke_guess`` and ``mg_llava`` (whose converters share the
    row handling and ``grounding_invalid``); see :func:`~llamafactory_vision.dataset_rows.align_with_row_checks`."""
    return align_with_row_checks(
        dataset, dataset_attr, data_args, training_args, dataset_attr.formatting, "grounding_invalid"
    )
