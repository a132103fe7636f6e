"""Grounding metrics, defined as published results define them.

All boxes are ``(x1, y1, x2, y2)`` in one coordinate space shared by the prediction and its label (0-1000 integers,
model-view pixels, or 0-1 floats: IoU is invariant to scaling each axis, so no image size is needed). Each row is one
of three kinds, decided by its label:

- **rec** (a referring expression: the label has exactly one box). As in published RefCOCO Acc@0.5, only the FIRST
  predicted box is scored: its IoU with the label box (0 when the answer has no box). Extra boxes never raise
  accuracy; they lower ``precision@0.5``.
- **detect** (the label has several boxes: a ``detect`` row, or a ``rec`` row naming several objects). Predicted boxes
  are matched one-to-one to label boxes (Hungarian matching maximising the summed IoU); each label box gets the IoU
  of its match, or 0. Reported as recall and precision at IoU 0.5.
- **reg** (region captioning, box -> phrase: the label has no box, or the dataset says ``task: reg``). Scored by its
  text; never counted in box metrics or parse failures.

Reported keys (:func:`summarize`; the trainer prefixes them, e.g. ``predict_acc@0.5``):

- ``rows``: every row scored, of all kinds.
- ``n``: rec rows; ``acc@0.5``, ``acc@0.75``: fraction of rec rows whose first predicted box reaches that IoU;
  ``miou``: mean IoU of the first predicted box over rec rows; ``precision@0.5``: rec rows whose first box reaches
  IoU 0.5, over all boxes predicted in rec rows.
- ``detect_rows``: detect rows; ``detect_n``: their label boxes; ``detect_recall@0.5``: matched label boxes with IoU
  >= 0.5 over ``detect_n``; ``detect_precision@0.5``: the same matches over all boxes predicted in detect rows;
  ``detect_miou``: mean matched IoU over ``detect_n``.
- ``reg_rows``: reg rows; ``reg_exact``: fraction whose answer equals the label phrase (surrounding whitespace
  ignored); ``reg_match``: the same after normalising both (case, punctuation, whitespace, a leading article).
- ``parse_failures``: rec and detect rows whose answer holds no readable box (they score 0).
- ``label_parse_failures``: rows that should have label boxes (the dataset says rec/detect) but whose label holds
  none; they are left out of every other key. Without the dataset a box-less label is a reg row, so this is 0.
- ``head_n``, ``head_acc@0.5``, ``head_acc@0.75``, ``head_miou``, ``head_precision@0.5`` and ``head_detect_*``: the
  same definitions for the boxes a bbox regression head wrote, over the rows that carry head boxes; present only when
  some rec/detect row does. ``head_failures``: rows for which the head could not run (logged with their row index);
  they carry no head box, so they score 0 in the head keys, as an answer without a box does. Reported with the head
  keys.
- ``coord_space_suspect``: 1 when the predicted boxes look like another coordinate space than the labels' (see
  :func:`check_coordinate_space`; a warning says why), else 0. ``pred_out_of_range``: fraction of predicted boxes
  outside the family's coordinate range, present when that range is known.

Beside these, ``predict_results.json`` holds the host's ROUGE/BLEU and the generation settings of the run
(``decoding_do_sample``, ``decoding_temperature``, ... see ``workflow.decoding_settings``); ``eval/ground_eval.py``
adds ``family``, ``bad_rows``, ``decoding``, ``coord_space_warning`` and, with ``--visualize``, ``visualized`` and
``visualize_failures`` (its docstring).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..boxes import box_iou, elementwise_box_iou, to_xyxy
from .formats import RELATIVE_SCALE, Box, parse_answer

ACC_THRESHOLDS = (0.5, 0.75)
PRECISION_THRESHOLD = 0.5
KINDS = ("rec", "detect", "reg")

# Which field of a ``predict_boxes_head`` object is written in the same space as a family's answer text.
HEAD_BOX_FIELDS: dict[str, str] = {
    "qwen2_vl": "xyxy_1000",  # 0-1000 of the image
    "qwen3_vl": "xyxy_1000",
    "qwen2_5_vl": "xyxy_model",  # pixels of the image as the model sees it
}

# Largest coordinate each family writes, as (x, y); None where it depends on the image (Qwen2.5-VL: model-view pixels).
FAMILY_BOUNDS: dict[str, tuple[float, float] | None] = {
    "qwen2_vl": (RELATIVE_SCALE, RELATIVE_SCALE),
    "qwen3_vl": (RELATIVE_SCALE, RELATIVE_SCALE),
    "qwen2_5_vl": None,
    "llava": (1.0, 1.0),
}
# The coordinate-space check speaks only about a run with at least this many boxes / compared rows.
MIN_CHECKED = 5
# A predicted box is "the label box in another space" when it is the label box scaled by at least this factor.
SCALE_FACTOR = 1.2


def _valid_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``Tensor[N]`` bool: finite boxes with ``x1 < x2`` and ``y1 < y2``, for ``boxes`` of shape ``Tensor[N, 4]``."""
    finite = torch.isfinite(boxes).all(dim=1)
    return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def iou_matrix(pred: Sequence[Sequence[float]], label: Sequence[Sequence[float]]) -> torch.Tensor:
    """``Tensor[N, M]`` float64 IoU of ``N`` predicted and ``M`` label boxes; 0 for a degenerate or non-finite box.

    No eps: an IoU of exactly 0.5 must reach the 0.5 threshold. The union of two valid boxes is positive; pairs with a
    degenerate box (0 / 0, or box_iou taking an inverted box's negative area at face value) are masked to 0.
    """
    pred_t = torch.as_tensor(pred, dtype=torch.float64).reshape(-1, 4)
    label_t = torch.as_tensor(label, dtype=torch.float64).reshape(-1, 4)
    iou = box_iou(pred_t, label_t, eps=0.0)
    valid = _valid_boxes(pred_t)[:, None] & _valid_boxes(label_t)[None, :]
    return torch.where(valid, iou, torch.zeros_like(iou))  # where() also drops the NaN of 0 / 0


def match_boxes(pred: Sequence[Sequence[float]], label: Sequence[Sequence[float]]) -> list[float]:
    """IoU of each label box with the predicted box matched to it one-to-one (detect rows).

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
    iou = iou_matrix(pred, label).numpy()
    scores = [0.0] * len(label)
    for r, c in zip(*linear_sum_assignment(iou, maximize=True)):
        scores[c] = float(iou[r, c])
    return scores


def first_box_iou(pred: Sequence[Sequence[float]], label: Sequence[float]) -> float:
    """IoU of the first predicted box with the one label box (rec rows, the published protocol); 0 with no box."""
    return first_box_ious([pred], [label])[0]


def paired_iou(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``Tensor[N]`` float64 IoU of ``pred[i]`` with ``label[i]``, both ``Tensor[N, 4]`` xyxy in one space.

    The diagonal of :func:`iou_matrix`, computed without the ``N x N`` matrix: the same operations in the same order
    (so the same float64 values), no eps, and 0 for a pair with a degenerate or non-finite box.
    """
    pred, label = pred.to(torch.float64), label.to(torch.float64)
    iou = elementwise_box_iou(pred, label, eps=0.0)
    return torch.where(_valid_boxes(pred) & _valid_boxes(label), iou, torch.zeros_like(iou))


def first_box_ious(preds: Sequence[Sequence[Sequence[float]]], labels: Sequence[Sequence[float]]) -> list[float]:
    """:func:`first_box_iou` of many rows in one vectorised call: ``preds[i]`` the predicted boxes of row ``i``
    (possibly none: IoU 0), ``labels[i]`` its one label box. Returns one float per row."""
    with_box = [i for i, pred in enumerate(preds) if len(pred)]
    ious = [0.0] * len(preds)
    if with_box:
        # numpy builds the [N, 4] array from Python sequences faster than torch.tensor does; the values are the same
        pred_t = torch.from_numpy(np.array([preds[i][0] for i in with_box], dtype=np.float64).reshape(-1, 4))
        label_t = torch.from_numpy(np.array([labels[i] for i in with_box], dtype=np.float64).reshape(-1, 4))
        for i, iou in zip(with_box, paired_iou(pred_t, label_t).tolist()):
            ious[i] = iou
    return ious


def normalize_phrase(text: str) -> str:
    """A phrase for a tolerant text match: NFKC, case-folded, punctuation dropped, whitespace collapsed, without a
    leading article (``"A Red car."`` -> ``"red car"``)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    words = re.sub(r"[^\w\s]", " ", text).split()
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more, built once a row
class BoxScore:
    """How one set of predicted boxes scores against a row's label boxes.

    Attributes:
        ious: rec: ``[IoU of the first predicted box]``; detect: one matched IoU per label box.
        num_pred: predicted boxes.
    """

    ious: list[float]
    num_pred: int


def score_boxes(pred: Sequence[Sequence[float]], label: Sequence[Sequence[float]]) -> BoxScore:
    """rec (one label box): the first predicted box; detect (several): Hungarian matching. ``label`` non-empty."""
    return score_many_boxes([(pred, label)])[0]


def score_many_boxes(pairs: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]]]) -> list[BoxScore]:
    """:func:`score_boxes` of many ``(pred, label)`` pairs: the first-box IoU of every rec pair in one vectorised
    call (:func:`first_box_ious`), detect pairs matched one by one."""
    rec = [i for i, (_, label) in enumerate(pairs) if len(label) == 1]
    rec_ious = dict(zip(rec, first_box_ious([pairs[i][0] for i in rec], [pairs[i][1][0] for i in rec])))
    return [
        BoxScore(ious=[rec_ious[i]] if i in rec_ious else match_boxes(pred, label), num_pred=len(pred))
        for i, (pred, label) in enumerate(pairs)
    ]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more, built once a row
class RowScore:
    """Scores of one (prediction, label) row.

    Attributes:
        kind: ``"rec"``, ``"detect"``, ``"reg"``, or ``"label_failed"`` (boxes expected, none in the label).
        text: box rows: the predicted boxes' score (``None`` for reg and label_failed rows).
        pred_failed: a box row whose answer holds no readable box.
        reg_exact, reg_match: reg rows: the answer equals the label phrase as is / once normalised.
        head: box rows with head boxes: their score; ``None`` otherwise.
        head_failed: the head could not run for this row (it then carries no head box).
        pred_boxes, label_boxes: the boxes scored, kept for :func:`check_coordinate_space`.
    """

    kind: str
    text: BoxScore | None = None
    pred_failed: bool = False
    reg_exact: bool = False
    reg_match: bool = False
    head: BoxScore | None = None
    head_failed: bool = False
    pred_boxes: tuple[Box, ...] = ()
    label_boxes: tuple[Box, ...] = ()


def score_row(
    predict: str,
    label: str,
    head_boxes: Sequence[Sequence[float]] | None = None,
    task: str | None = None,
    pred_boxes: Sequence[Sequence[float]] | None = None,
    label_boxes: Sequence[Sequence[float]] | None = None,
    head_failed: bool = False,
) -> RowScore:
    """Score one row from its decoded prediction and label texts (same family, same coordinate space).

    Args:
        predict: the decoded answer.
        label: the decoded label (for reg rows: the phrase).
        head_boxes: the head's boxes in the label's space (see :func:`head_boxes_for_family`), if any.
        task: the dataset's task of the row (``rec``, ``reg`` or ``detect``) when known; ``None`` infers reg from a
            box-less label.
        pred_boxes: the answer's boxes already read (e.g. decoded to ``[0, 1]``); default: parsed from ``predict``.
        label_boxes: the label boxes from the dataset (floats, not the rounded label text), in the same space as
            ``pred_boxes``; default: parsed from ``label``.
        head_failed: the head could not run for this row; ``head_boxes`` is then taken as none (scores 0).
    """
    return score_rows([predict], [label], [head_boxes], [task], [pred_boxes], [label_boxes], [head_failed])[0]


def score_rows(
    predicts: Sequence[str],
    labels: Sequence[str],
    head_boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
    tasks: Sequence[str | None] | None = None,
    pred_boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
    label_boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
    head_failed: Sequence[bool] | None = None,
) -> list[RowScore]:
    """:func:`score_row` of many rows (its arguments as per-row lists, ``None`` for all-default), with the IoUs of
    all rec rows computed in one vectorised call instead of one small tensor computation per row."""
    n = len(predicts)
    tasks, head_failed = tasks or [None] * n, head_failed or [False] * n
    pred_boxes, label_boxes = pred_boxes or [None] * n, label_boxes or [None] * n
    # A row whose head could not run is scored as one without a head box (0), so failures never raise accuracy.
    head_boxes = [[] if failed else boxes for boxes, failed in zip(head_boxes or [None] * n, head_failed, strict=True)]
    parts = [_row_parts(*args) for args in zip(predicts, labels, tasks, pred_boxes, label_boxes, strict=True)]
    box_rows = [i for i, part in enumerate(parts) if part[0] in ("rec", "detect")]
    text = [None] * n
    for i, score in zip(box_rows, score_many_boxes([(parts[i][4], parts[i][5]) for i in box_rows])):
        text[i] = score
    with_head = [i for i in box_rows if head_boxes[i] is not None]
    head = [None] * n
    for i, score in zip(with_head, score_many_boxes([(head_boxes[i], parts[i][5]) for i in with_head])):
        head[i] = score
    rows = []
    for parts_of_row, text_score, head_score, failed in zip(parts, text, head, head_failed, strict=True):
        kind, pred_failed, reg_exact, reg_match, row_pred_boxes, row_label_boxes = parts_of_row
        rows.append(
            RowScore(kind, text_score, pred_failed, reg_exact, reg_match, head_score, failed, row_pred_boxes,
                     row_label_boxes)  # the fields in RowScore's order
        )  # fmt: skip
    return rows


def _row_parts(
    predict: str,
    label: str,
    task: str | None,
    pred_boxes: Sequence[Sequence[float]] | None,
    label_boxes: Sequence[Sequence[float]] | None,
) -> tuple[str, bool, bool, bool, tuple[Box, ...], tuple[Box, ...]]:
    """:func:`score_row` without the box scores: ``(kind, pred_failed, reg_exact, reg_match, pred_boxes,
    label_boxes)`` of a :class:`RowScore` (a plain tuple: the row is built once, with its scores)."""
    if task is not None and task not in KINDS:
        raise ValueError(f"task={task!r}: expected one of {KINDS} or None")
    if label_boxes is None:
        parsed_label = parse_answer(label)
        label_boxes = [] if parsed_label.failed else parsed_label.boxes
    if task == "reg" or (task is None and not label_boxes):
        return (
            "reg",
            False,
            predict.strip() == label.strip(),
            normalize_phrase(predict) == normalize_phrase(label),
            (),
            (),
        )
    if not label_boxes:
        return "label_failed", False, False, False, (), ()
    if pred_boxes is None:
        pred_boxes = parse_answer(predict).boxes
    kind = "rec" if len(label_boxes) == 1 else "detect"
    return kind, not pred_boxes, False, False, tuple(map(tuple, pred_boxes)), tuple(map(tuple, label_boxes))


def _rec_summary(scores: Sequence[BoxScore], prefix: str) -> dict[str, float | int]:
    """``n``, ``acc@t``, ``miou``, ``precision@0.5`` over rec rows (0 when there are none: ``n`` then says 0)."""
    ious = [s.ious[0] for s in scores]
    count = max(len(ious), 1)
    out: dict[str, float | int] = {f"{prefix}n": len(ious)}
    out.update({f"{prefix}acc@{t}": sum(v >= t for v in ious) / count for t in ACC_THRESHOLDS})
    out[f"{prefix}miou"] = sum(ious) / count
    hits = sum(v >= PRECISION_THRESHOLD for v in ious)
    out[f"{prefix}precision@{PRECISION_THRESHOLD}"] = hits / max(sum(s.num_pred for s in scores), 1)
    return out


def _detect_summary(scores: Sequence[BoxScore], prefix: str) -> dict[str, float | int]:
    """``detect_rows``, ``detect_n``, recall / precision at 0.5 and mean matched IoU over detect rows."""
    ious = [v for s in scores for v in s.ious]
    # Matching is one-to-one, so label boxes reaching the threshold are exactly the predicted boxes that do.
    hits = sum(v >= PRECISION_THRESHOLD for v in ious)
    return {
        f"{prefix}detect_rows": len(scores),
        f"{prefix}detect_n": len(ious),
        f"{prefix}detect_recall@{PRECISION_THRESHOLD}": hits / max(len(ious), 1),
        f"{prefix}detect_precision@{PRECISION_THRESHOLD}": hits / max(sum(s.num_pred for s in scores), 1),
        f"{prefix}detect_miou": sum(ious) / max(len(ious), 1),
    }


def _fold(values: np.ndarray, keep: np.ufunc) -> np.ndarray:
    """``builtins.min`` (``keep=np.less``) or ``max`` (``np.greater``) over the last axis of ``values`` ``[..., K]``,
    taken the way they take it (the first value, replaced by each later one that compares ``keep``), so the result is
    theirs value for value, NaN and signed zeros included."""
    out = values[..., 0]
    for k in range(1, values.shape[-1]):
        out = np.where(keep(values[..., k], out), values[..., k], out)
    return out


def _extents(boxes_per_row: Sequence[Sequence[Box]]) -> np.ndarray:
    """``[R, 4]`` float64 ``(cx, w, cy, h)`` of the extent of each row's boxes (at least one a row): the union box
    ``(min x1, min y1, max x2, max y2)``, its centre and size, by the float operations scalar Python would do."""
    out = np.empty((len(boxes_per_row), 4))
    by_count: dict[int, list[int]] = {}
    for i, boxes in enumerate(boxes_per_row):
        by_count.setdefault(len(boxes), []).append(i)
    for count, rows in by_count.items():  # one array per box count: [rows, count, 4]
        boxes = np.array([boxes_per_row[i] for i in rows], dtype=np.float64).reshape(len(rows), count, 4)
        x1, y1 = _fold(boxes[:, :, 0], np.less), _fold(boxes[:, :, 1], np.less)
        x2, y2 = _fold(boxes[:, :, 2], np.greater), _fold(boxes[:, :, 3], np.greater)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN, as in Python: no ratio for the row
            out[rows] = np.stack([(x1 + x2) / 2, x2 - x1, (y1 + y2) / 2, y2 - y1], axis=1)
    return out


@dataclass(frozen=True)
class CoordinateCheck:
    """Outcome of :func:`check_coordinate_space`: metric keys and a warning (``None`` when nothing looks wrong)."""

    metrics: dict[str, float | int]
    warning: str | None


def check_coordinate_space(
    rows: Sequence[RowScore], family: str | None = None, bounds: tuple[float, float] | None = None
) -> CoordinateCheck:
    """Do the predicted boxes of a run live in the labels' coordinate space?

    Two signs that they do not, each needing at least :data:`MIN_CHECKED` boxes / rows to speak:

    - most predicted boxes fall outside ``bounds`` (largest ``(x, y)`` of the space; default: the family's, see
      :data:`FAMILY_BOUNDS`, unknown for Qwen2.5-VL's model-view pixels), or, in a space larger than 0-1, most
      predicted boxes lie within ``[0, 1]`` (normalised floats written for pixels or 0-1000);
    - in most rows that have both, the predicted box extent is the label box extent scaled by at least
      :data:`SCALE_FACTOR` (up or down) in both axes, centre and size alike: the same box in another space. For
      Qwen2.5-VL, predictions scaled up and never past 1000 look like Qwen2-VL / Qwen3-VL's 0-1000 coordinates.

    Args:
        rows: scored rows; only rec and detect rows with predicted boxes count.
        family: the answers' family (for ``bounds`` and the wording), or ``None``.
        bounds: overrides the family's bounds (e.g. ``(1, 1)`` for boxes decoded to ``[0, 1]``).
    """
    if bounds is None and family is not None:
        bounds = FAMILY_BOUNDS.get(family)
    box_rows = [r for r in rows if r.kind in ("rec", "detect") and r.pred_boxes]
    # Every predicted box as one [N, 4] array; per box the min and max of its 4 numbers as builtins.min/max give them.
    preds = np.array([b for r in box_rows for b in r.pred_boxes], dtype=np.float64).reshape(-1, 4)
    low, high = _fold(preds, np.less), _fold(preds, np.greater)
    metrics: dict[str, float | int] = {}
    warnings = []
    if bounds is not None:
        bx, by = bounds
        outside = int(np.count_nonzero(
            (low < 0) | (preds[:, 0] > bx) | (preds[:, 2] > bx) | (preds[:, 1] > by) | (preds[:, 3] > by)
        ))  # fmt: skip
        metrics["pred_out_of_range"] = outside / max(len(preds), 1)
        if len(preds) >= MIN_CHECKED and outside > len(preds) / 2:
            warnings.append(
                f"{outside} of {len(preds)} predicted boxes fall outside the coordinate range 0-{bx:g} x 0-{by:g}"
                f"{f' of {family}' if family else ''}: the model seems to write another coordinate space."
            )
        unit = int(np.count_nonzero((low >= 0) & (high <= 1)))
        if min(bx, by) > 1 and len(preds) >= MIN_CHECKED and unit > len(preds) / 2:
            warnings.append(
                f"{unit} of {len(preds)} predicted boxes lie within [0, 1]: they look like normalised coordinates, "
                f"but the labels use 0-{bx:g}."
            )
    # Per row, the ratios (cx, w, cy, h) of the predicted box extent to the label box extent, where a centre or a size
    # is not positive: a ratio would mean nothing.
    pred_extents, label_extents = (
        _extents([r.pred_boxes for r in box_rows]),
        _extents([r.label_boxes for r in box_rows]),
    )
    both = np.concatenate([pred_extents, label_extents], axis=1)
    with_ratio = (np.isfinite(both) & (both > 0)).all(axis=1)
    with np.errstate(over="ignore", under="ignore"):  # a ratio past the float range is inf / 0, as in Python
        ratios = pred_extents[with_ratio] / label_extents[with_ratio]
    log_factor, tolerance = math.log(SCALE_FACTOR), math.log(1.25)

    def scaled(ratio: tuple[float, float, float, float], sign: int) -> bool:
        logs = [math.log(v) for v in ratio]
        same_box = abs(logs[0] - logs[1]) < tolerance and abs(logs[2] - logs[3]) < tolerance
        return same_box and all(sign * v >= log_factor for v in logs)

    # Only a row whose four ratios are all near or past SCALE_FACTOR (up or down) can be scaled; the margin is far
    # wider than math.log's rounding, so the rows left out would fail `scaled` too.
    near_up = (ratios >= SCALE_FACTOR * (1 - 1e-6)).all(axis=1)
    near_down = (ratios <= (1 + 1e-6) / SCALE_FACTOR).all(axis=1)
    candidates = ratios[near_up | near_down].tolist()
    checked = len(ratios)
    for sign, direction in ((1, "up"), (-1, "down")):
        hits = [r for r in candidates if scaled(r, sign)]
        if checked >= MIN_CHECKED and len(hits) > checked / 2:
            sx = sorted(r[0] for r in hits)[len(hits) // 2]
            sy = sorted(r[2] for r in hits)[len(hits) // 2]
            message = (
                f"in {len(hits)} of {checked} rows the predicted box is the label box scaled {direction} "
                f"(median x{sx:.2f} in x, x{sy:.2f} in y): the predictions use another coordinate space than the labels"
            )
            if family == "qwen2_5_vl" and sign > 0 and bool((high <= RELATIVE_SCALE).all()):
                message += (
                    "; they look like 0-1000 coordinates (Qwen2-VL / Qwen3-VL), but Qwen2.5-VL writes pixels of the "
                    "image as the model sees it"
                )
            warnings.append(message + ".")
    metrics["coord_space_suspect"] = int(bool(warnings))
    return CoordinateCheck(metrics=metrics, warning=" ".join(warnings) or None)


def summarize(rows: Sequence[RowScore], check: CoordinateCheck | None = None) -> dict[str, float | int]:
    """Aggregate row scores into the metric dict described in the module docstring, with ``check``'s keys
    (default: :func:`check_coordinate_space` of ``rows`` without a family)."""
    by_kind = {kind: [r for r in rows if r.kind == kind] for kind in (*KINDS, "label_failed")}
    out: dict[str, float | int] = {"rows": len(rows)}
    out.update(_rec_summary([r.text for r in by_kind["rec"]], ""))
    out.update(_detect_summary([r.text for r in by_kind["detect"]], ""))
    reg = by_kind["reg"]
    out["reg_rows"] = len(reg)
    out["reg_exact"] = sum(r.reg_exact for r in reg) / max(len(reg), 1)
    out["reg_match"] = sum(r.reg_match for r in reg) / max(len(reg), 1)
    out["parse_failures"] = sum(r.pred_failed for r in rows)
    out["label_parse_failures"] = len(by_kind["label_failed"])
    head_rec = [r.head for r in by_kind["rec"] if r.head is not None]
    head_detect = [r.head for r in by_kind["detect"] if r.head is not None]
    head_failures = sum(r.head_failed for r in rows)
    if head_rec or head_detect or head_failures:
        out.update(_rec_summary(head_rec, "head_"))
        out.update(_detect_summary(head_detect, "head_"))
        out["head_failures"] = head_failures
    out.update((check or check_coordinate_space(rows)).metrics)
    return out


class GroundingMetricAccumulator:
    """Collects row scores batch by batch and reports them once (HF Trainer ``batch_eval_metrics`` semantics).

    Call :meth:`update` with each batch's decoded texts (or :meth:`add` with rows scored by :func:`score_row`) and
    :meth:`compute` at the end of the split; ``compute`` returns the metric dict and starts a fresh split, and
    :attr:`warning` then holds the coordinate-space warning of that split, if any.

    Args:
        family: the answers' family (see :func:`check_coordinate_space`), or ``None``.
        bounds: overrides the family's coordinate bounds.
    """

    def __init__(self, family: str | None = None, bounds: tuple[float, float] | None = None) -> None:
        self.family, self.bounds = family, bounds
        self.warning: str | None = None
        self._rows: list[RowScore] = []

    def update(
        self,
        preds: Sequence[str],
        labels: Sequence[str],
        head_boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
        tasks: Sequence[str | None] | None = None,
        head_failed: Sequence[bool] | None = None,
    ) -> None:
        """Score a batch.

        Args:
            preds: decoded predictions, one per row.
            labels: decoded labels, one per row, same family as ``preds``.
            head_boxes: optional, per row the head's boxes in the label text's space, or ``None`` for a row
                without them.
            tasks: optional, per row the dataset's task (``rec``/``reg``/``detect``) or ``None``.
            head_failed: optional, per row whether the head could not run for it.
        """
        if len(preds) != len(labels):
            raise ValueError(f"preds has {len(preds)} rows but labels has {len(labels)}")
        for name, values in (("head_boxes", head_boxes), ("tasks", tasks), ("head_failed", head_failed)):
            if values is not None and len(values) != len(preds):
                raise ValueError(f"{name} has {len(values)} rows but preds has {len(preds)}")
        head_boxes = head_boxes if head_boxes is not None else [None] * len(preds)
        tasks = tasks if tasks is not None else [None] * len(preds)
        self._rows.extend(score_rows(preds, labels, head_boxes, tasks, head_failed=head_failed))

    def add(self, row: RowScore) -> None:
        """Add one row scored by :func:`score_row`."""
        self._rows.append(row)

    def compute(self) -> dict[str, float | int]:
        """Metrics over every row since the last ``compute``; then resets."""
        rows, self._rows = self._rows, []
        check = check_coordinate_space(rows, self.family, self.bounds)
        self.warning = check.warning
        return summarize(rows, check)


def grounding_scores(
    pairs: Iterable[tuple[str, str]],
    head_boxes: Iterable[Sequence[Sequence[float]] | None] | None = None,
    family: str | None = None,
) -> dict[str, float | int]:
    """Metrics over ``(predict_text, label_text)`` pairs; see the module docstring for the keys.

    ``head_boxes``, when given, yields one entry per pair: the head's boxes in the label text's space, or ``None``.
    """
    rows = list(pairs)
    accumulator = GroundingMetricAccumulator(family)
    accumulator.update([p for p, _ in rows], [t for _, t in rows], None if head_boxes is None else list(head_boxes))
    return accumulator.compute()
