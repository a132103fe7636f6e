"""Grounding metrics: how well predicted boxes cover label boxes.

All boxes are ``(x1, y1, x2, y2)`` in one coordinate space shared by the prediction and its label (0-1000 integers,
model-view pixels or 0-1 floats: IoU is scale-invariant, so no image size is needed). Predicted boxes are matched
one-to-one to label boxes (Hungarian matching maximising the summed IoU); every label box gets the IoU of its match,
or 0 when it has none. Accuracies and mean IoU are averaged over label boxes.

Reported keys (:meth:`GroundingMetricAccumulator.compute`):

- ``rows``: rows scored; ``n``: label boxes scored (rows whose label cannot be parsed add none).
- ``acc@0.5``, ``acc@0.75``: fraction of label boxes whose matched IoU reaches the threshold.
- ``miou``: mean matched IoU over label boxes.
- ``precision@0.5``: matched predicted boxes with IoU >= 0.5 over all predicted boxes.
- ``parse_failures``: predictions with no readable box (their label boxes score 0);
  ``label_parse_failures``: labels with no readable box.
- ``head_n``, ``head_acc@0.5``, ``head_acc@0.75``, ``head_miou``: the same for the boxes a bbox regression head
  wrote, present only when some row carries head boxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from ..boxes import box_iou, to_xyxy
from .formats import Box, parse_answer

ACC_THRESHOLDS = (0.5, 0.75)
PRECISION_THRESHOLD = 0.5

# Which field of a ``predict_boxes_head`` object is written in the same space as a family's answer text.
HEAD_BOX_FIELDS: dict[str, str] = {
    "qwen2_vl": "xyxy_1000",  # 0-1000 of the image
    "qwen3_vl": "xyxy_1000",
    "qwen2_5_vl": "xyxy_model",  # pixels of the image as the model sees it
}


def _valid_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``Tensor[N]`` bool: finite boxes with ``x1 < x2`` and ``y1 < y2``, for ``boxes`` of shape ``Tensor[N, 4]``."""
    finite = torch.isfinite(boxes).all(dim=1)
    return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def match_boxes(pred: Sequence[Sequence[float]], label: Sequence[Sequence[float]]) -> list[float]:
    """IoU of each label box with the predicted box matched to it one-to-one.

    Args:
        pred: ``N`` predicted boxes ``(x1, y1, x2, y2)``.
        label: ``M`` label boxes ``(x1, y1, x2, y2)`` in the same coordinate space as ``pred``.

    Returns:
        ``M`` floats in ``[0, 1]``, in label order: the IoU of the predicted box assigned to that label box by a
        Hungarian matching that maximises the summed IoU, or 0 when no predicted box is left for it. Degenerate or
        non-finite boxes (``x2 <= x1`` or ``y2 <= y1``) have IoU 0 with everything.
    """
    if not label:
        return []
    if not pred:
        return [0.0] * len(label)
    pred_t = torch.as_tensor(pred, dtype=torch.float64).reshape(-1, 4)
    label_t = torch.as_tensor(label, dtype=torch.float64).reshape(-1, 4)
    # No eps: an IoU of exactly 0.5 must reach the 0.5 threshold. The union of two valid boxes is positive; pairs
    # with a degenerate box (0 / 0, or box_iou taking an inverted box's negative area at face value) are masked.
    iou = box_iou(pred_t, label_t, eps=0.0)
    valid = _valid_boxes(pred_t)[:, None] & _valid_boxes(label_t)[None, :]
    iou = torch.where(valid, iou, torch.zeros_like(iou)).numpy()  # where() also drops the NaN of 0 / 0
    scores = [0.0] * len(label)
    for r, c in zip(*linear_sum_assignment(iou, maximize=True)):
        scores[c] = float(iou[r, c])
    return scores


def head_boxes_for_family(objects: Sequence[Mapping[str, Sequence[float]]], family: str) -> list[Box]:
    """Pick, from a row's ``predict_boxes_head`` objects, the boxes written in ``family``'s answer space.

    Args:
        objects: one mapping per predicted object, with ``xyxy_1000`` (0-1000 of the image) and ``xyxy_model``
            (model-view pixels), each 4 numbers.
        family: a key of :data:`HEAD_BOX_FIELDS`.

    Returns:
        One ``(x1, y1, x2, y2)`` per object, comparable with the boxes parsed from that family's label text.

    Raises:
        ValueError: an unknown ``family``, or an object without a readable box in the family's field (a
            :class:`~llamafactory_vision.boxes.BoxError` naming ``predict_boxes_head[i].<field>``).
    """
    if family not in HEAD_BOX_FIELDS:
        raise ValueError(f"family={family!r} has no head box space; expected one of {sorted(HEAD_BOX_FIELDS)}")
    key = HEAD_BOX_FIELDS[family]
    boxes = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, Mapping) or key not in obj:
            raise ValueError(f"predict_boxes_head[{i}]={obj!r}: expected an object with a {key!r} box")
        boxes.append(to_xyxy(obj[key], "xyxy", field=f"predict_boxes_head[{i}].{key}"))
    return boxes


@dataclass(frozen=True)
class RowScore:
    """Scores of one (prediction, label) row.

    Attributes:
        label_ious: one matched IoU per label box (empty when the label has no readable box).
        num_pred: predicted boxes read from the prediction.
        pred_failed: the prediction has no readable box.
        label_failed: the label has no readable box.
        head_ious: one matched IoU per label box for the head's boxes, or ``None`` when the row has none.
    """

    label_ious: list[float]
    num_pred: int
    pred_failed: bool
    label_failed: bool
    head_ious: list[float] | None = None


def score_row(predict: str, label: str, head_boxes: Sequence[Sequence[float]] | None = None) -> RowScore:
    """Score one row from its decoded prediction and label texts (same family, same coordinate space).

    ``head_boxes`` (``(x1, y1, x2, y2)`` in the label text's space, see :func:`head_boxes_for_family`) is scored
    against the same label boxes when given.
    """
    parsed_pred, parsed_label = parse_answer(predict), parse_answer(label)
    label_boxes = [] if parsed_label.failed else parsed_label.boxes
    pred_boxes = [] if parsed_pred.failed else parsed_pred.boxes
    return RowScore(
        label_ious=match_boxes(pred_boxes, label_boxes),
        num_pred=len(pred_boxes),
        pred_failed=parsed_pred.failed,
        label_failed=parsed_label.failed,
        head_ious=None if head_boxes is None else match_boxes(head_boxes, label_boxes),
    )


def _iou_summary(ious: Sequence[float], prefix: str = "") -> dict[str, float]:
    """``acc@t`` for each threshold and ``miou`` over ``ious``; 0 for an empty list (``n`` then says 0)."""
    count = max(len(ious), 1)
    out = {f"{prefix}acc@{t}": sum(v >= t for v in ious) / count for t in ACC_THRESHOLDS}
    out[f"{prefix}miou"] = sum(ious) / count
    return out


def summarize(rows: Sequence[RowScore]) -> dict[str, float | int]:
    """Aggregate row scores into the metric dict described in the module docstring."""
    ious = [v for row in rows for v in row.label_ious]
    num_pred = sum(row.num_pred for row in rows)
    out: dict[str, float | int] = {"rows": len(rows), "n": len(ious), **_iou_summary(ious)}
    # Matching is one-to-one, so label boxes reaching the threshold are exactly the predicted boxes that do.
    out[f"precision@{PRECISION_THRESHOLD}"] = sum(v >= PRECISION_THRESHOLD for v in ious) / max(num_pred, 1)
    out["parse_failures"] = sum(row.pred_failed for row in rows)
    out["label_parse_failures"] = sum(row.label_failed for row in rows)
    head_rows = [row for row in rows if row.head_ious is not None]
    if head_rows:
        head_ious = [v for row in head_rows for v in row.head_ious]
        out["head_n"] = len(head_ious)
        out.update(_iou_summary(head_ious, prefix="head_"))
    return out


class GroundingMetricAccumulator:
    """Collects row scores batch by batch and reports them once (HF Trainer ``batch_eval_metrics`` semantics).

    Call :meth:`update` with each batch's decoded texts and :meth:`compute` at the end of the split; ``compute``
    returns the metric dict and starts a fresh split. The trainer prefixes the keys (``predict_acc@0.5``).
    """

    def __init__(self) -> None:
        self._rows: list[RowScore] = []

    def update(
        self,
        preds: Sequence[str],
        labels: Sequence[str],
        head_boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
    ) -> None:
        """Score a batch.

        Args:
            preds: decoded predictions, one per row.
            labels: decoded labels, one per row, same family as ``preds``.
            head_boxes: optional, per row the head's boxes in the label text's space, or ``None`` for a row
                without them.
        """
        if len(preds) != len(labels):
            raise ValueError(f"preds has {len(preds)} rows but labels has {len(labels)}")
        if head_boxes is None:
            head_boxes = [None] * len(preds)
        elif len(head_boxes) != len(preds):
            raise ValueError(f"head_boxes has {len(head_boxes)} rows but preds has {len(preds)}")
        self._rows.extend(score_row(p, t, h) for p, t, h in zip(preds, labels, head_boxes))

    def compute(self) -> dict[str, float | int]:
        """Metrics over every row since the last ``compute``; then resets."""
        rows, self._rows = self._rows, []
        return summarize(rows)


def grounding_scores(
    pairs: Iterable[tuple[str, str]],
    head_boxes: Iterable[Sequence[Sequence[float]] | None] | None = None,
) -> dict[str, float | int]:
    """Metrics over ``(predict_text, label_text)`` pairs; see the module docstring for the keys.

    ``head_boxes``, when given, yields one entry per pair: the head's boxes in the label text's space, or ``None``.
    """
    rows = list(pairs)
    accumulator = GroundingMetricAccumulator()
    accumulator.update([p for p, _ in rows], [t for _, t in rows], None if head_boxes is None else list(head_boxes))
    return accumulator.compute()
