"""Column names of a ``grounding`` dataset, carried by LLaMA-Factory's ``DatasetAttr``.

Its own module because patches.py installs it while ``llamafactory.data.parser`` is being imported: it must import
nothing else from the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamafactory.data.parser import DatasetAttr

# Field of ours -> its key under `columns` in dataset_info.json, which is also the default column name.
GROUNDING_COLUMNS = {
    "images": "images",
    "image": "image",
    "objects": "objects",
    "bbox_format": "bbox_format",
    "task": "task",
    "grounding_prompt": "prompt",
}


def join_columns(dataset_attr: DatasetAttr, attr: dict[str, Any], fields: Mapping[str, str]) -> None:
    """Point each field of ``dataset_attr`` (a key of ``fields``) at its column: the name dataset_info.json's
    ``columns`` gives for ``fields[field]``, or ``fields[field]`` itself when not renamed there.

    Args:
        dataset_attr (DatasetAttr): the entry being joined; its fields are set in place.
        attr (dict): the dataset's entry in dataset_info.json.
        fields (Mapping[str, str]): field name -> key under ``columns`` (= default column name).
    """
    columns = attr.get("columns", {})
    for field, key in fields.items():
        setattr(dataset_attr, field, columns.get(key, key))


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
        if self.formatting == "grounding":
            join_columns(self, attr, GROUNDING_COLUMNS)
