"""The one ``DatasetAttr`` that replaces the host's: the column names of every dataset format of ours.

Installed by patches.py while ``llamafactory.data.parser`` is being imported, so it (and the per-format classes it
combines) import nothing else from the host. Each base's ``join`` calls ``super().join`` first and then fills its
own columns only for its own ``formatting``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamafactory_vision.editing.dataset_attr import EditDatasetAttr
from llamafactory_vision.fusion.dataset_attr import MGDatasetAttr
from llamafactory_vision.strokes.dataset_attr import StrokeDatasetAttr


@dataclass(repr=False)
class VisionDatasetAttr(EditDatasetAttr, StrokeDatasetAttr, MGDatasetAttr):
    """Grounding, ``mg_llava``, ``stroke_guess`` and ``edit`` columns on top of the host's ``DatasetAttr``."""
