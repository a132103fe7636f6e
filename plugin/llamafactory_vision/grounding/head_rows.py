"""What the bbox head predicts for each row at predict time, packed into one tensor per batch.

The trainer returns that tensor beside the generated tokens from ``prediction_step``; the host's evaluation loop then
pads and gathers both alike across processes, so each row's head boxes and dataset index stay with its generated text
whatever the number of processes. With an uneven split the sampler repeats rows to give every process as many
batches, and in this stack (transformers 5.6, accelerate 1.11) the gather keeps those repeats: the row index lets
metrics and saved predictions keep each row once (:func:`first_occurrences`).

Layout of one row (float32, ``2 + 8 * K`` columns, the tail padded by anyone with any value): ``[row, n, box_1, ...,
box_n]``, where ``row`` is the row's index in the evaluation dataset, ``n`` its number of boxes and each box is
``xyxy_1000`` (4 ints, 0-1000 of the image) followed by ``xyxy_model`` (4 floats, pixels of the model-view image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ROW_COLUMN = "lfv_row"  # the evaluation dataset's row index, added as a column for generation
_HEADER = 2
_PER_BOX = 8

HeadBox = dict[str, list]  # {"xyxy_1000": [4 ints], "xyxy_model": [4 floats]}


def pack_head_rows(row_ids: Sequence[int], boxes: Sequence[Sequence[HeadBox]]) -> torch.Tensor:
    """``row_ids`` (B) and per row a list of head boxes -> ``FloatTensor[B, 2 + 8 * K]`` (K: most boxes in a row)."""
    if len(row_ids) != len(boxes):
        raise ValueError(f"{len(row_ids)} row ids for {len(boxes)} rows of head boxes")
    width = _HEADER + _PER_BOX * max((len(b) for b in boxes), default=0)
    packed = torch.zeros((len(row_ids), width), dtype=torch.float32)
    for i, (row, row_boxes) in enumerate(zip(row_ids, boxes)):
        packed[i, 0], packed[i, 1] = row, len(row_boxes)
        for k, box in enumerate(row_boxes):
            start = _HEADER + _PER_BOX * k
            packed[i, start : start + _PER_BOX] = torch.tensor([*box["xyxy_1000"], *box["xyxy_model"]])
    return packed


def unpack_head_rows(packed: np.ndarray | torch.Tensor) -> tuple[list[int], list[list[HeadBox]]]:
    """Inverse of :func:`pack_head_rows` on the gathered array ``[N, 2 + 8 * K]``: row ids and boxes per row."""
    packed = np.asarray(packed, dtype=np.float32)
    rows, boxes = [], []
    for line in packed:
        count = int(line[1])
        rows.append(int(line[0]))
        row_boxes = []
        for k in range(count):
            values = line[_HEADER + _PER_BOX * k : _HEADER + _PER_BOX * (k + 1)]
            row_boxes.append({"xyxy_1000": [round(float(v)) for v in values[:4]], "xyxy_model": values[4:].tolist()})
        boxes.append(row_boxes)
    return rows, boxes


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
