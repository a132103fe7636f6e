"""The ``mg_llava`` dataset format: a ShareGPT row (``conversations`` + one image) plus detector boxes per image.

    {"conversations": [{"from": "human", "value": "<image>What is on the table?"}, {"from": "gpt", "value": "..."}],
     "images": ["img.jpg"],
     "objects": [{"ref": "cup", "bbox": [x1, y1, x2, y2]}, ...],   # optional; pixels of the original image
     "bbox_format": "xyxy"}                                          # optional: xyxy | xywh | cxcywh

Boxes are validated as in the ``grounding`` format (same checks and errors naming dataset, row and field), at most
``mg_max_objects`` per image, normalised to the original image and carried beside the image path to the
``llava_mg`` plugin (``{"path", "bytes", "mg_boxes"}``), which maps them to the high-res input. A row without
objects gets zero object tokens (logged once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llamafactory.data.converter import SharegptDatasetConverter

from llamafactory_vision.fusion.dataset_attr import MG_FORMATTING
from llamafactory_vision.fusion.templates import BOXES_KEY, MG_TEMPLATE
from llamafactory_vision.grounding.data import GroundingDatasetConverter
from llamafactory_vision.log import get_logger

logger = get_logger(__name__)


@dataclass
class MGDatasetConverter(GroundingDatasetConverter):
    """ShareGPT conversion by the host's converter, plus validated object boxes on the row's image."""

    kind = MG_FORMATTING

    def __post_init__(self):
        if self.data_args.template != MG_TEMPLATE:
            raise ValueError(
                f"dataset {self.dataset_attr.dataset_name!r} has formatting `{MG_FORMATTING}`, which needs template "
                f"`{MG_TEMPLATE}`; got {self.data_args.template!r}."
            )
        self.sharegpt = SharegptDatasetConverter(self.dataset_attr, self.data_args)

    def convert(self, example: dict[str, Any], row: int | None) -> dict[str, Any]:
        aligned = self.sharegpt(example)
        objects = self._column(example, self.dataset_attr.objects)
        if not aligned["_images"]:
            if objects:
                raise self._fail(row, self.dataset_attr.objects, "objects given but the row has no image",
                                 "missing_image")  # fmt: skip
            return aligned
        path, size = self._image_path(example, row)
        boxes = []
        if objects:
            boxes = [list(o.box) for o in self._objects(example, row, size)]
            if len(boxes) > self.data_args.mg_max_objects:
                raise self._fail(row, self.dataset_attr.objects, f"{len(boxes)} objects, more than mg_max_objects="
                                 f"{self.data_args.mg_max_objects}", "too_many_objects")  # fmt: skip
        else:
            logger.warning_rank0_once(
                f"{MG_FORMATTING} dataset {self.dataset_attr.dataset_name!r}: rows without `objects` get zero object "
                "tokens (only the fused image tokens)."
            )
        return {**aligned, "_images": [{"path": path, "bytes": None, BOXES_KEY: json.dumps(boxes)}]}
