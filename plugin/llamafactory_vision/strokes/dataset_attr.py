"""Column names of a ``stroke_guess`` dataset, carried by LLaMA-Factory's ``DatasetAttr``.

Installed by patches.py while ``llamafactory.data.parser`` is being imported: it imports nothing else from the host.
It extends the grounding attributes (one class replaces the host's, so the subclasses chain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr, join_columns

STROKE_FORMATTING = "stroke_guess"
STROKE_COLUMNS = ("images", "image", "task", "strokes", "stroke_mask", "answer", "stroke_width")


@dataclass(repr=False)
class StrokeDatasetAttr(GroundingDatasetAttr):
    """Adds the columns of a ``stroke_guess`` dataset (``image``/``images`` and ``task`` come from grounding)."""

    strokes: str | None = "strokes"
    stroke_mask: str | None = "stroke_mask"
    answer: str | None = "answer"
    stroke_width: str | None = "stroke_width"

    def join(self, attr: dict[str, Any]) -> None:
        super().join(attr)
        if self.formatting == STROKE_FORMATTING:
            join_columns(self, attr, {name: name for name in STROKE_COLUMNS})
