"""What predict knows of each row beside its generated text, packed into one tensor per batch.

The trainer returns that tensor beside the generated tokens from ``prediction_step``; the host's evaluation loop then
pads and gathers both alike across processes, so each row's head boxes, dataset index, model-view size and label
boxes stay with its generated text whatever the number of processes. With an uneven split the sampler repeats rows to
give every process as many batches, and in this stack (transformers 5.6, accelerate 1.11) the gather keeps those
repeats: the row index lets metrics and saved predictions keep each row once (:func:`first_occurrences`).

Layout of one row (float64, the tail padded by anyone with any value)::

    [row, n_head, n_label, width, height, head box 1 (8), ..., head box n_head (8), label box 1 (4), ...]

``row`` is the row's index in the evaluation dataset (-1: unknown); ``n_head`` its number of head boxes, or
:data:`HEAD_FAILED` when the head could not run for this row; ``n_label`` its number of label boxes from the dataset,
or -1 when not known; ``width, height`` the image as the model sees it (pixels). Each head box is ``xyxy_1000``
(4 ints, 0-1000 of the image) followed by ``xyxy_model`` (4 floats, pixels of the model-view image); each label box is
the dataset's float box, ``xyxy`` normalised to ``[0, 1]`` of the image (never rounded to the family's grid). Float64
keeps the row index and the label floats exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ROW_COLUMN = "lfv_row"  # the evaluation dataset's row index, added as a column for generation
LABEL_BOXES_COLUMN = "lfv_label_boxes"  # the dataset's float label boxes of a row, normalised xyxy, for generation
HEAD_FAILED = -1  # ``n_head`` of a row whose head forward pass failed (no head boxes)
_HEADER = 5
_PER_HEAD_BOX = 8
_PER_LABEL_BOX = 4

HeadBox = dict[str, list]  # {"xyxy_1000": [4 ints], "xyxy_model": [4 floats]}


@dataclass(frozen=True)
class PredictRow:
    """What :func:`pack_head_rows` carries for one generated row.

    Attributes:
        row: index in the evaluation dataset, from 0; -1 when unknown.
        head: the head's boxes; ``None`` when the head failed for this row; empty in a run without the head.
        model_size: ``(width, height)`` in pixels of the image as the model sees it.
        label: the dataset's float label boxes, ``xyxy`` in ``[0, 1]`` of the image; ``None`` when not known.
    """

    row: int
    head: list[HeadBox] | None
    model_size: tuple[int, int]
    label: list[tuple[float, float, float, float]] | None = None


def pack_head_rows(rows: Sequence[PredictRow]) -> torch.Tensor:
    """One :class:`PredictRow` per generated row (B) -> ``Float64Tensor[B, W]`` in the module's layout."""
    flat = []
    for r in rows:
        head = [] if r.head is None else [v for box in r.head for v in (*box["xyxy_1000"], *box["xyxy_model"])]
        label = [] if r.label is None else [v for box in r.label for v in box]
        n_head = HEAD_FAILED if r.head is None else len(r.head)
        n_label = -1 if r.label is None else len(r.label)
        flat.append([r.row, n_head, n_label, *r.model_size, *head, *label])
    packed = torch.zeros((len(flat), max((len(f) for f in flat), default=_HEADER)), dtype=torch.float64)
    for i, values in enumerate(flat):
        packed[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
    return packed


def unpack_head_rows(packed: np.ndarray | torch.Tensor) -> list[PredictRow]:
    """Inverse of :func:`pack_head_rows` on the gathered array ``[N, W]`` (possibly widened by padding)."""
    packed = np.asarray(packed, dtype=np.float64)
    rows = []
    for line in packed:
        n_head, n_label = int(line[1]), int(line[2])
        head = None
        if n_head != HEAD_FAILED:
            head = []
            for k in range(n_head):
                values = line[_HEADER + _PER_HEAD_BOX * k : _HEADER + _PER_HEAD_BOX * (k + 1)]
                head.append({"xyxy_1000": [round(float(v)) for v in values[:4]], "xyxy_model": values[4:].tolist()})
        label = None
        if n_label >= 0:
            start = _HEADER + _PER_HEAD_BOX * max(n_head, 0)
            values = line[start : start + _PER_LABEL_BOX * n_label].tolist()
            label = [tuple(values[k : k + _PER_LABEL_BOX]) for k in range(0, len(values), _PER_LABEL_BOX)]
        rows.append(PredictRow(int(line[0]), head, (int(line[3]), int(line[4])), label))
    return rows


def first_occurrences(row_ids: Sequence[int], seen: set[int] | None = None) -> list[int]:
    """Positions of the rows to keep: the first of each dataset row index (later ones are the sampler's repeats).

    ``seen``: indices kept by earlier calls (updated in place), for batch-by-batch use. Index -1 (unknown) is always
    kept.
    """
    seen = set() if seen is None else seen
    keep = []
    for position, row in enumerate(row_ids):
        if row < 0 or row not in seen:
            keep.append(position)
            if row >= 0:
                seen.add(row)
    return keep
