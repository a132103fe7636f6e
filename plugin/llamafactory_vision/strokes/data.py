"""The ``stroke_guess`` dataset format (MagicQuill Draw&Guess), turned into LLaMA-Factory's aligned format.

A row (column names mappable through ``columns`` in dataset_info.json)::

    {"image": "img.png",                         # or "images": ["img.png"]; exactly one image
     "strokes": [[[x, y], [x, y], ...], ...],    # polylines in pixels of the image; or
     "stroke_mask": "mask.png",                  # a mask of the same size (pixels > 127 are stroked)
     "answer": "cat",                            # what the sketch depicts / what the contour encloses
     "task": "guess",                            # optional: guess (default) | contour
     "stroke_width": 8}                          # optional: brush diameter in pixels for `strokes`

Rendering happens here, once per row: ``guess`` paints the stroked pixels black or white, ``contour`` draws the
region's outer contour in red (see render.py). The rendered image is written to ``stroke_cache_dir`` under a hash of
the row's inputs, and that file becomes the row's image, so training, predict and the datasets cache all read the
same picture; the template's plugin then pads it to a square. The prompt gives the strokes' bbox (pixels divided by
the original width and height). Invalid rows raise an error naming dataset, row and field (or are counted and
skipped with ``grounding_invalid: skip``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from llamafactory.extras.constants import IMAGE_PLACEHOLDER
from PIL import Image, UnidentifiedImageError

from llamafactory_vision.grounding.data import GroundingDatasetConverter
from llamafactory_vision.strokes import render
from llamafactory_vision.strokes.dataset_attr import STROKE_FORMATTING
from llamafactory_vision.strokes.templates import get_stroke_spec, load_stroke_specs

# Bump when render.py changes what it draws, so cached renders are not reused.
RENDER_VERSION = 1


@dataclass(frozen=True)
class StrokeQuery:
    """A rendered Draw&Guess input: the image the model sees (before square padding) and the prompt's corners."""

    image: Image.Image
    bbox: tuple[int, int, int, int]
    corners: tuple[float, float, float, float]


def render_query(image: Image.Image, mask: np.ndarray, task: str, width: int) -> StrokeQuery:
    """Render ``task`` on ``image`` for the region ``mask`` (``(H, W)`` bool, non-empty) and compute its corners.

    Used by the converter and by chat callers (``ChatModel``), so both send the model the same picture and numbers.
    """
    pixels = np.asarray(image.convert("RGB"))
    bbox = render.stroke_bbox(mask)
    rendered = Image.fromarray(render.render(pixels, mask, task, width))
    return StrokeQuery(rendered, bbox, render.normalized_corners(bbox, image.size))


@dataclass
class StrokeGuessDatasetConverter(GroundingDatasetConverter):
    """Converts one ``stroke_guess`` row into ``_prompt``/``_response``/``_images`` (the rendered image)."""

    kind = STROKE_FORMATTING

    def __post_init__(self):
        self.spec = get_stroke_spec(self.data_args.template)
        if self.spec is None:
            raise ValueError(
                f"dataset {self.dataset_attr.dataset_name!r} has formatting `{STROKE_FORMATTING}`, which needs a "
                f"stroke template ({', '.join(load_stroke_specs())}); got template {self.data_args.template!r}."
            )
        self.cache_dir = self.data_args.resolved_stroke_cache_dir()

    def _task(self, example: dict[str, Any], row: int | None) -> str:
        task = self._column(example, self.dataset_attr.task) or "guess"
        if task not in render.TASKS:
            raise self._fail(row, self.dataset_attr.task, f"unknown task {task!r}; use one of {render.TASKS}",
                             "unknown_task")  # fmt: skip
        return task

    def _width(self, example: dict[str, Any], row: int | None, size: tuple[int, int]) -> int:
        width = self._column(example, self.dataset_attr.stroke_width)
        if width is None:
            return render.default_stroke_width(size)
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise self._fail(row, self.dataset_attr.stroke_width, f"expected an int >= 1, got {width!r}", "bad_width")
        return int(width)

    def _strokes(self, strokes: Any, row: int | None, size: tuple[int, int]) -> list[list[tuple[float, float]]]:
        field = self.dataset_attr.strokes
        if not isinstance(strokes, list) or not strokes:
            raise self._fail(row, field, f"expected a non-empty list of strokes, got {strokes!r}", "empty_strokes")
        width, height = size
        result = []
        for i, stroke in enumerate(strokes):
            if not isinstance(stroke, list) or not stroke:
                raise self._fail(row, f"{field}[{i}]", f"expected a non-empty list of [x, y], got {stroke!r}",
                                 "empty_strokes")  # fmt: skip
            points = []
            for j, point in enumerate(stroke):
                where = f"{field}[{i}][{j}]"
                if (
                    not isinstance(point, list | tuple)
                    or len(point) != 2
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in point)
                    or not all(math.isfinite(v) for v in point)
                ):
                    raise self._fail(row, where, f"expected [x, y] of 2 finite numbers, got {point!r}", "bad_point")
                x, y = float(point[0]), float(point[1])
                if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                    raise self._fail(
                        row, where, f"point ({x:g}, {y:g}) is outside the {width}x{height} image "
                        f"(pixel centres 0..{width - 1}, 0..{height - 1})", "outside_image",
                    )  # fmt: skip
                points.append((x, y))
            result.append(points)
        return result

    def _mask_file(self, value: Any, row: int | None, size: tuple[int, int]) -> tuple[np.ndarray, str]:
        field = self.dataset_attr.stroke_mask
        if not isinstance(value, str) or not value:
            raise self._fail(row, field, f"expected a mask image path, got {value!r}", "bad_mask")
        (path,) = self._find_medias([value])
        if not os.path.isfile(path):
            raise self._fail(row, field, f"mask file not found: {path!r}", "bad_mask")
        try:
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L")) > 127
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise self._fail(row, field, f"cannot read mask {path!r}: {err}", "bad_mask") from err
        if mask.shape != (size[1], size[0]):
            raise self._fail(row, field, f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {size[0]}x{size[1]}",
                             "bad_mask")  # fmt: skip
        if not mask.any():
            raise self._fail(row, field, f"mask {path!r} has no stroked pixel (none > 127)", "empty_strokes")
        return mask, path

    def _region(self, example, row, size, width) -> tuple[np.ndarray, list[Any]]:
        """The stroked region as a mask, plus what identifies it for the cache key."""
        strokes = self._column(example, self.dataset_attr.strokes)
        mask_path = self._column(example, self.dataset_attr.stroke_mask)
        if strokes is not None and mask_path is not None:
            raise self._fail(row, self.dataset_attr.strokes, "give `strokes` or `stroke_mask`, not both",
                             "bad_strokes")  # fmt: skip
        if strokes is None and mask_path is None:
            raise self._fail(row, self.dataset_attr.strokes, "no `strokes` and no `stroke_mask` given",
                             "empty_strokes")  # fmt: skip
        if strokes is not None:
            points = self._strokes(strokes, row, size)
            return render.strokes_mask(points, size, width), ["strokes", points, width]
        mask, path = self._mask_file(mask_path, row, size)
        return mask, ["mask", os.path.abspath(path), os.stat(path).st_mtime_ns]

    def _answer(self, example: dict[str, Any], row: int | None) -> str:
        answer = self._column(example, self.dataset_attr.answer)
        if not isinstance(answer, str) or not answer.strip():
            raise self._fail(row, self.dataset_attr.answer, f"expected a non-empty string, got {answer!r}",
                             "bad_answer")  # fmt: skip
        return answer.strip()

    def _rendered_path(self, key: list[Any], image_path: str, mask: np.ndarray, task: str, width: int) -> str:
        digest = hashlib.sha256(json.dumps(key).encode("utf-8")).hexdigest()[:32]
        out = os.path.join(self.cache_dir, digest[:2], f"{digest}.png")
        if not os.path.isfile(out):  # content-addressed: an existing file holds this very render
            with Image.open(image_path) as image:
                query = render_query(image, mask, task, width)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tmp"
            query.image.save(tmp, format="PNG")
            os.replace(tmp, out)  # atomic: concurrent ranks/workers never read a half-written file
        return out

    def convert(self, example: dict[str, Any], row: int | None) -> dict[str, Any]:
        """Aligned output for one row; raises ``GroundingDataError`` (naming dataset, row, field) on invalid input."""
        image_path, size = self._image_path(example, row)
        task = self._task(example, row)
        width = self._width(example, row, size)
        mask, region_key = self._region(example, row, size, width)
        answer = self._answer(example, row)
        stat = os.stat(image_path)
        key = [RENDER_VERSION, os.path.abspath(image_path), stat.st_size, stat.st_mtime_ns, task, region_key]
        rendered = self._rendered_path(key, image_path, mask, task, width)
        corners = render.normalized_corners(render.stroke_bbox(mask), size)
        phrasing_key = f"{os.path.basename(image_path)}|{task}|{answer}"  # stable across machines and cache dirs
        prompt = IMAGE_PLACEHOLDER + "\n" + self.spec.prompt(task, phrasing_key, corners)
        return {
            "_prompt": [{"role": "user", "content": prompt}],
            "_response": [{"role": "assistant", "content": answer}],
            "_system": "",
            "_tools": "",
            "_images": [rendered],
            "_videos": None,
            "_audios": None,
        }


def chat_inputs(
    image: Image.Image, mask: np.ndarray, task: str = "guess", width: int | None = None,
    template: str = "llava_strokes", key: str = "",
) -> tuple[Image.Image, str]:
    """The rendered image and user message for asking a trained model in chat (``ChatModel.chat``), built exactly
    as the converter builds a training row (``key`` picks the phrasing, as the row's ``image|task|answer`` does).

    Args:
        image: the user's picture (any mode; RGB is used).
        mask: ``np.ndarray[bool]`` ``(H, W)``, the stroked region (``render.strokes_mask`` turns polylines into one).
        task: ``guess`` or ``contour``.
        width: contour thickness in pixels (default: ``render.default_stroke_width``).
    """
    spec = get_stroke_spec(template)
    if spec is None:
        raise ValueError(f"template={template!r} is not a stroke template ({', '.join(load_stroke_specs())}).")
    if task not in render.TASKS:
        raise ValueError(f"task={task!r}: expected one of {render.TASKS}")
    query = render_query(image, mask, task, width or render.default_stroke_width(image.size))
    return query.image, IMAGE_PLACEHOLDER + "\n" + spec.prompt(task, key, query.corners)
