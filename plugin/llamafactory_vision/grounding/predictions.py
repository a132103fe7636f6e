"""Reading LLaMA-Factory predict outputs beside the dataset they came from (eval CLI and web UI share these)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamafactory_vision.boxes import denormalize_xyxy
from llamafactory_vision.grounding.formats import Box, BoxCodec


def read_predictions(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """``(row index, object)`` for every line that is a JSON object with string ``predict`` and ``label``.

    Returns those rows and the number of other non-blank lines. The row index is the object's ``row`` (the dataset
    row our trainer records with the bbox head), else the line number counting every line (blank ones included), so
    it stays aligned with the dataset rows the predictions came from.
    """
    rows, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict) and isinstance(obj.get("predict"), str) and isinstance(obj.get("label"), str):
                row = obj.get("row")
                rows.append((row if isinstance(row, int) and not isinstance(row, bool) else index, obj))
            else:
                bad += 1
    return rows, bad


def read_dataset(path: Path) -> list[Any]:
    """Rows of a LLaMA-Factory dataset file: a JSON list, or JSON lines (an unreadable line becomes ``None``)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(None)
    return rows


def image_path(row: Any, dataset_dir: Path) -> Path | None:
    """First image of a dataset row (``images`` list or ``image`` string), resolved against ``dataset_dir``."""
    if not isinstance(row, dict):
        return None
    image = row.get("images", row.get("image"))
    if isinstance(image, list):
        image = image[0] if image else None
    if not isinstance(image, str):
        return None
    return dataset_dir / image  # an absolute ``image`` replaces dataset_dir


def to_pixels(
    boxes: Sequence[Sequence[float]], codec: BoxCodec, model_size: tuple[int, int], image_size: tuple[int, int]
) -> list[Box]:
    """Boxes as a family writes them -> ``xyxy`` pixels of the original image of ``image_size = (width, height)``."""
    return [denormalize_xyxy(codec.decode_box(box, model_size=model_size), image_size) for box in boxes]
