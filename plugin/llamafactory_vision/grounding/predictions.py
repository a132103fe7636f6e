"""Reading LLaMA-Factory predict outputs beside the dataset they came from (eval CLI and web UI share these), and
scoring a row against the dataset's own boxes (``eval/ground_eval.py --images`` and predict's metrics share that)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_vision.boxes import denormalize_xyxy
from llamafactory_vision.grounding.formats import Box, BoxCodec, parse_answer
from llamafactory_vision.grounding.metrics import RowScore, score_rows

# Rows scored in [0, 1] of the image are checked against these coordinate bounds (see check_coordinate_space).
NORMALIZED_BOUNDS = (1.0, 1.0)


def read_predictions(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """``(row index, object)`` for every line that is a JSON object with string ``predict`` and ``label``.

    Returns those rows and the number of other non-blank lines. The row index is the object's ``row`` (the dataset
    row our predict trainer records), else the line number counting every line (blank ones included), so
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


@dataclass(frozen=True)
class NormalizedBoxes:
    """One row's boxes, every one ``xyxy`` normalised to ``[0, 1]`` of the image.

    Attributes:
        predict: the boxes of the answer text.
        label: the dataset's float boxes when known, else the boxes of the label text.
        head: the bbox head's boxes, or ``None`` when the row has none.
    """

    predict: list[Box]
    label: list[Box]
    head: list[Box] | None


def normalize_row_boxes(
    predict: str,
    label: str,
    codec: BoxCodec,
    model_size: tuple[int, int],
    dataset_label: Sequence[Box] | None = None,
    head: Sequence[Sequence[float]] | None = None,
) -> NormalizedBoxes:
    """Read and normalise a row's boxes.

    Args:
        predict, label: the decoded answer and label texts, written by ``codec``'s family.
        codec: the family's codec.
        model_size: ``(width, height)`` the codec decodes with (model-view pixels for Qwen2.5-VL, the original size
            for LLaVA; unused by the 0-1000 families).
        dataset_label: the dataset's float boxes of the row, normalised ``xyxy``; ``None`` when the row is not known
            (the label text's boxes, rounded to the family's grid, are used instead).
        head: the head's boxes as the family writes them (see ``metrics.head_boxes_for_family``), or ``None``.
    """

    def decode(boxes: Sequence[Sequence[float]]) -> list[Box]:
        return [codec.decode_box(box, model_size=model_size) for box in boxes]

    return NormalizedBoxes(
        predict=decode(parse_answer(predict).boxes),
        label=list(dataset_label) if dataset_label is not None else decode(parse_answer(label).boxes),
        head=None if head is None else decode(head),
    )


def score_normalized_row(
    predict: str, label: str, boxes: NormalizedBoxes, task: str | None = None, head_failed: bool = False
) -> RowScore:
    """``metrics.score_row`` on boxes from :func:`normalize_row_boxes` (score with bounds
    :data:`NORMALIZED_BOUNDS`); a ``reg`` row is scored by its text."""
    return score_normalized_rows([predict], [label], [boxes], [task], [head_failed])[0]


def score_normalized_rows(
    predicts: Sequence[str],
    labels: Sequence[str],
    boxes: Sequence[NormalizedBoxes],
    tasks: Sequence[str | None],
    head_failed: Sequence[bool],
) -> list[RowScore]:
    """:func:`score_normalized_row` of many rows (per-row lists), scored in one ``metrics.score_rows`` call."""
    return score_rows(
        predicts,
        labels,
        [b.head for b in boxes],
        tasks,
        pred_boxes=[b.predict for b in boxes],
        label_boxes=[b.label if task != "reg" else None for b, task in zip(boxes, tasks, strict=True)],
        head_failed=head_failed,
    )
