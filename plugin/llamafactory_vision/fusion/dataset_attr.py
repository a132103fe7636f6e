"""Column names of an ``mg_llava`` dataset, carried by LLaMA-Factory's ``DatasetAttr``.

Its own module for the reason given in grounding/dataset_attr.py (installed while ``llamafactory.data.parser`` is
being imported). The ShareGPT columns (``messages``, ``images``) are the host's; the object boxes are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr, join_columns

MG_FORMATTING = "mg_llava"
MG_COLUMNS = ("objects", "bbox_format")


@dataclass(repr=False)
class MGDatasetAttr(GroundingDatasetAttr):
    """Lets ``columns`` in dataset_info.json rename an ``mg_llava`` dataset's ``objects`` and ``bbox_format``."""

    def join(self, attr: dict[str, Any]) -> None:
        super().join(attr)
        if self.formatting == MG_FORMATTING:
            join_columns(self, attr, {name: name for name in MG_COLUMNS})
