"""Column names of an ``edit`` dataset, carried by LLaMA-Factory's ``DatasetAttr``.

Its own module for the reason given in grounding/dataset_attr.py (installed while ``llamafactory.data.parser`` is
being imported). It extends the grounding subclass so that one ``DatasetAttr`` knows both formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr, join_columns

EDIT_COLUMNS = ("source", "instruction", "target", "expressive", "target_caption")


@dataclass(repr=False)
class EditDatasetAttr(GroundingDatasetAttr):
    """Adds the columns of an ``edit`` dataset (each renamable through ``columns`` in dataset_info.json)."""

    source: str | None = "source"
    instruction: str | None = "instruction"
    target: str | None = "target"
    expressive: str | None = "expressive"
    target_caption: str | None = "target_caption"

    def join(self, attr: dict[str, Any]) -> None:
        super().join(attr)
        if self.formatting == "edit":
            join_columns(self, attr, {name: name for name in EDIT_COLUMNS})
