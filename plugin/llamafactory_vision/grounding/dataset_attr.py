"""Column names of a ``grounding`` dataset, carried by LLaMA-Factory's ``DatasetAttr``.

Its own module because patches.py installs it while ``llamafactory.data.parser`` is being imported: it must import
nothing else from the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory.data.parser import DatasetAttr


@dataclass(repr=False)
class GroundingDatasetAttr(DatasetAttr):
    """The host's ``DatasetAttr`` plus the column names of a ``grounding`` dataset."""

    image: str | None = "image"
    objects: str | None = "objects"
    bbox_format: str | None = "bbox_format"
    task: str | None = "task"
    grounding_prompt: str | None = "prompt"

    def join(self, attr: dict[str, Any]) -> None:
        super().join(attr)
        if self.formatting != "grounding":
            return
        columns = attr.get("columns", {})
        self.images = columns.get("images", "images")
        for name in ("image", "objects", "bbox_format", "task"):
            setattr(self, name, columns.get(name, getattr(self, name)))
        self.grounding_prompt = columns.get("prompt", self.grounding_prompt)
