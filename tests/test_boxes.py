"""Box math against torchvision.ops (the oracle) and the validation reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.ops as tvops
from llamafactory_vision.boxes import (
    BOX_FORMATS,
    BoxError,
    bbox_regression_loss,
    box_convert,
    box_iou,
    denormalize_xyxy,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou_loss,
    normalize_xyxy,
    to_xyxy,
    validate_pixel_box,
)


def random_xyxy(n: int, seed: int, scale: float = 100.0) -> torch.Tensor:
    """Tensor[n, 4] of valid xyxy boxes (positive width and height) within about [0, 1.5 * scale]."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale / 2 + scale / 100
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# IoU / GIoU vs torchvision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_box_iou_matches_torchvision(seed):
    a, b = random_xyxy(7, seed).float(), random_xyxy(5, seed + 100).float()
    ours = box_iou(a, b)
    assert ours.shape == (7, 5) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, tvops.box_iou(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_elementwise_iou_and_giou_match_torchvision_diagonal(seed):
    a, b = random_xyxy(9, seed), random_xyxy(9, seed + 1)
    torch.testing.assert_close(elementwise_box_iou(a, b), tvops.box_iou(a, b).diagonal(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        elementwise_generalized_box_iou(a, b), tvops.generalized_box_iou(a, b).diagonal(), rtol=1e-6, atol=1e-8
    )
    # Identical boxes: IoU = GIoU = 1; disjoint far-apart boxes: GIoU -> -1.
    torch.testing.assert_close(elementwise_generalized_box_iou(a, a), torch.ones(9, dtype=torch.float64))
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[1e4, 1e4, 1e4 + 1, 1e4 + 1]])
    assert elementwise_generalized_box_iou(*far).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_giou_loss_matches_torchvision(reduction):
    a, b = random_xyxy(11, 3).float(), random_xyxy(11, 4).float()
    torch.testing.assert_close(
        generalized_box_iou_loss(a, b, reduction=reduction),
        tvops.generalized_box_iou_loss(a, b, reduction=reduction),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype):
    # Pixel-scale boxes: areas of ~1e6 overflow float16 (max 65504) unless upcast.
    a, b = random_xyxy(6, 5, scale=2000.0).to(dtype), random_xyxy(6, 6, scale=2000.0).to(dtype)
    a32, b32 = a.float(), b.float()  # the same (rounded) values in float32
    ours = box_iou(a, b)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, tvops.box_iou(a32, b32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        elementwise_generalized_box_iou(a, b), tvops.generalized_box_iou(a32, b32).diagonal(), rtol=1e-5, atol=1e-6
    )
    loss = generalized_box_iou_loss(a, b, reduction="mean")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, tvops.generalized_box_iou_loss(a32, b32, reduction="mean"))


def test_empty_inputs():
    empty = torch.zeros(0, 4, requires_grad=True)
    assert box_iou(empty, random_xyxy(3, 0).float()).shape == (0, 3)
    assert box_iou(random_xyxy(3, 0).float(), empty).shape == (3, 0)
    assert elementwise_box_iou(empty, empty).shape == (0,)
    assert elementwise_generalized_box_iou(empty, empty).shape == (0,)
    for reduction in ("mean", "sum"):
        loss = generalized_box_iou_loss(empty, empty, reduction=reduction)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert empty.grad is not None and empty.grad.shape == (0, 4)


def test_gradients_flow():
    a = random_xyxy(5, 8).float().requires_grad_(True)
    b = random_xyxy(5, 9).float()
    generalized_box_iou_loss(a, b, reduction="sum").backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    ours_grad = a.grad.clone()

    a_tv = a.detach().clone().requires_grad_(True)
    tvops.generalized_box_iou_loss(a_tv, b, reduction="sum").backward()
    torch.testing.assert_close(ours_grad, a_tv.grad, rtol=1e-4, atol=1e-6)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="boxes1 must be a Tensor"):
        box_iou(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equal shape"):
        elementwise_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        generalized_box_iou_loss(torch.zeros(1, 4), torch.zeros(1, 4), reduction="avg")


# ---------------------------------------------------------------------------------------------------------------
# box_convert vs torchvision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_fmt", BOX_FORMATS)
@pytest.mark.parametrize("out_fmt", BOX_FORMATS)
def test_box_convert_matches_torchvision(in_fmt, out_fmt):
    boxes = tvops.box_convert(random_xyxy(8, 10), "xyxy", in_fmt)
    ours = box_convert(boxes, in_fmt, out_fmt)
    torch.testing.assert_close(ours, tvops.box_convert(boxes, in_fmt, out_fmt))
    assert ours.dtype == boxes.dtype
    with pytest.raises(BoxError) as info:
        box_convert(boxes, in_fmt, "yxyx")
    assert info.value.reason == "unknown_format" and info.value.field == "out_fmt"


# ---------------------------------------------------------------------------------------------------------------
# bbox_regression_loss vs a hand computation with torchvision
# ---------------------------------------------------------------------------------------------------------------


def test_bbox_regression_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred = torch.sigmoid(torch.randn(6, 4, generator=g)).requires_grad_(True)
    target_xyxy = random_xyxy(6, 11, scale=0.6)
    target = tvops.box_convert(target_xyxy, "xyxy", "cxcywh").float()

    out = bbox_regression_loss(pred, target)
    l1 = torch.nn.functional.l1_loss(pred, target, reduction="none").sum(dim=1).mean()
    giou = tvops.generalized_box_iou_loss(
        tvops.box_convert(pred, "cxcywh", "xyxy"), tvops.box_convert(target, "cxcywh", "xyxy"), reduction="mean"
    )
    torch.testing.assert_close(out["l1"], l1)
    torch.testing.assert_close(out["giou"], giou)
    torch.testing.assert_close(out["total"], 5.0 * l1 + 2.0 * giou)

    weighted = bbox_regression_loss(pred, target, l1_weight=1.5, giou_weight=0.5)
    torch.testing.assert_close(weighted["total"], 1.5 * l1 + 0.5 * giou)

    out["total"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_bbox_regression_loss_bf16_and_empty():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=torch.bfloat16, requires_grad=True)
    target = torch.tensor([[0.4, 0.5, 0.2, 0.2]])
    out = bbox_regression_loss(pred, target)
    assert all(v.dtype == torch.float32 for v in out.values())
    out["total"].backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16

    empty = torch.zeros(0, 4, requires_grad=True)
    out = bbox_regression_loss(empty, torch.zeros(0, 4))
    for value in out.values():
        assert value.item() == 0.0 and value.grad_fn is not None
    out["total"].backward()
    assert empty.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# Python-level validation
# ---------------------------------------------------------------------------------------------------------------


def test_to_xyxy_formats_and_types():
    assert to_xyxy([10, 20, 30, 40], "xyxy") == (10.0, 20.0, 30.0, 40.0)
    assert to_xyxy([10, 20, 30, 40], "xywh") == (10.0, 20.0, 40.0, 60.0)
    assert to_xyxy([10, 20, 4, 6], "cxcywh") == (8.0, 17.0, 12.0, 23.0)
    assert to_xyxy(np.array([1.5, 2, 3, 4], dtype=np.float32), "xyxy") == (1.5, 2.0, 3.0, 4.0)
    assert to_xyxy((np.int64(1), 2, 3, 4)) == (1.0, 2.0, 3.0, 4.0)
    assert all(type(v) is float for v in to_xyxy(torch.tensor([1, 2, 3, 4]), "xywh"))


@pytest.mark.parametrize(
    "box,fmt,reason",
    [
        ([1, 2, 3, 4], "yxyx", "unknown_format"),
        ("1,2,3,4", "xyxy", "not_a_sequence"),
        (None, "xyxy", "not_a_sequence"),
        (12, "xyxy", "not_a_sequence"),
        (np.float64(3.0), "xyxy", "not_a_sequence"),
        (torch.tensor(3.0), "xyxy", "not_a_sequence"),
        ([1, 2, 3], "xyxy", "wrong_length"),
        ([1, 2, 3, 4, 5], "xywh", "wrong_length"),
        ([1, "2", 3, 4], "xyxy", "not_numeric"),
        ([1, None, 3, 4], "xyxy", "not_numeric"),
        ([True, 2, 3, 4], "xyxy", "not_numeric"),
        ([1, 2, float("nan"), 4], "xyxy", "not_finite"),
        ([1, 2, 3, math.inf], "cxcywh", "not_finite"),
    ],
)
def test_to_xyxy_errors(box, fmt, reason):
    with pytest.raises(BoxError) as info:
        to_xyxy(box, fmt, field="objects[0].bbox")
    assert info.value.reason == reason
    assert info.value.field == ("fmt" if reason == "unknown_format" else "objects[0].bbox")
    assert reason in str(info.value)


def test_validate_pixel_box():
    assert validate_pixel_box([0, 0, 640, 480], "xyxy", (640, 480)) == (0.0, 0.0, 640.0, 480.0)
    assert validate_pixel_box([10, 20, 30, 40], "xywh", (640, 480)) == (10.0, 20.0, 40.0, 60.0)
    cases = [
        ([10, 10, 10, 20], "xyxy", "degenerate"),  # zero width
        ([30, 10, 10, 20], "xyxy", "degenerate"),  # x2 < x1
        ([10, 10, 0, 5], "xywh", "degenerate"),
        ([-1, 0, 10, 10], "xyxy", "outside_image"),
        ([0, 0, 641, 10], "xyxy", "outside_image"),
        ([600, 400, 50, 81], "xywh", "outside_image"),  # y2 = 481 > H: never clamped
        ([5, 5, 20, 20], "cxcywh", "outside_image"),  # x1 = -5
        ([1, 2, float("inf"), 4], "xyxy", "not_finite"),
    ]
    for box, fmt, reason in cases:
        with pytest.raises(BoxError) as info:
            validate_pixel_box(box, fmt, (640, 480), field="bbox")
        assert (info.value.reason, info.value.field) == (reason, "bbox"), (box, fmt)
    for size in [(0, 480), (640,), (640.0, 480), (-1, -1)]:
        with pytest.raises(BoxError) as info:
            validate_pixel_box([0, 0, 1, 1], "xyxy", size)
        assert (info.value.reason, info.value.field) == ("bad_image_size", "image_size")


def test_normalize_denormalize_round_trip():
    box = validate_pixel_box([64, 48, 320, 480], "xyxy", (640, 480))
    norm = normalize_xyxy(box, (640, 480))
    assert norm == (0.1, 0.1, 0.5, 1.0)
    assert denormalize_xyxy(norm, (640, 480)) == pytest.approx(box)
    # A resize without cropping keeps the normalised box: the same box on a 2x image.
    assert normalize_xyxy(denormalize_xyxy(norm, (1280, 960)), (1280, 960)) == pytest.approx(norm)
