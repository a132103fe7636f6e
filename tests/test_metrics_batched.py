"""The vectorised IoU of grounding/metrics.py (all rec rows in one call) against the per-row matrix and torchvision."""

from __future__ import annotations

import math

import torch
from llamafactory_vision.grounding.metrics import first_box_ious, iou_matrix, paired_iou, score_row, score_rows
from torchvision.ops import box_iou as tv_box_iou


def test_paired_iou_is_the_iou_matrix_diagonal_bit_for_bit_and_torchvision_on_valid_boxes():
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(500, 2, 2, generator=gen, dtype=torch.float64) * 1000
    pred = torch.cat([corners.min(1).values, corners.max(1).values + 1], 1)
    corners = torch.rand(500, 2, 2, generator=gen, dtype=torch.float64) * 1000
    label = torch.cat([corners.min(1).values, corners.max(1).values + 1], 1)
    # degenerate and non-finite boxes: IoU 0, as in iou_matrix
    pred[:5] = torch.tensor([[0, 0, 0, 10], [10, 10, 0, 0], [0, 0, math.inf, 10], [math.nan, 0, 5, 5], [5, 5, 5, 5]])
    got = paired_iou(pred, label)
    per_row = torch.stack([iou_matrix(p[None].tolist(), l[None].tolist())[0, 0] for p, l in zip(pred, label)])
    assert torch.equal(got, per_row)  # the same operations in the same order: identical float64 values
    assert torch.equal(got[:5], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(got[5:], tv_box_iou(pred[5:], label[5:]).diagonal(), atol=1e-12, rtol=0)


def test_first_box_ious_scores_the_first_box_and_zero_without_one():
    preds = [[(0, 0, 10, 10), (0, 0, 5, 5)], [], [(0, 0, 5, 10)]]
    labels = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    assert first_box_ious(preds, labels) == [1.0, 0.0, 0.5]
    assert first_box_ious([], []) == []


def test_score_rows_equals_scoring_each_row_alone():
    pairs = [
        ("a(100,100),(200,200)", "a(100,100),(200,200)"),  # rec
        ("a(100,100),(150,200) b(0,0),(10,10)", "a(100,100),(200,200)"),  # rec, first box scored
        ("no box", "a(100,100),(200,200)"),  # rec, parse failure
        ("a(0,0),(10,10) b(100,100),(200,200)", "a(100,100),(200,200) b(0,0),(10,10)"),  # detect: matched
        ("a red car", "A red car."),  # reg
    ]
    heads = [[(100, 100, 200, 200)], None, [(0, 0, 1, 1)], [(0, 0, 10, 10)], None]
    batched = score_rows([p for p, _ in pairs], [t for _, t in pairs], heads)
    # score_row goes through score_rows with one row: one row per call cannot share a vectorised call
    assert batched == [score_row(p, t, h) for (p, t), h in zip(pairs, heads)]
    assert [r.kind for r in batched] == ["rec", "rec", "rec", "detect", "reg"]
    assert [r.text.ious for r in batched[:4]] == [[1.0], [0.5], [0.0], [1.0, 1.0]]
    assert batched[0].head.ious == [1.0] and batched[1].head is None and batched[3].head.ious == [0.0, 1.0]
