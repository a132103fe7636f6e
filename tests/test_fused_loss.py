"""``bbox_fused_loss``: the fused head loss against torchvision's GIoU loss + torch's L1 (values), finite differences
(gradcheck) and autograd of the unfused ``bbox_regression_loss`` (gradients, ties and kinks included)."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops as tvops
from llamafactory_vision.boxes import bbox_regression_loss
from llamafactory_vision.grounding.fused_loss import fused_bbox_regression_loss

REDUCTIONS = ("mean", "sum")
DTYPES = (torch.float32, torch.float64)


def random_cxcywh(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Tensor[n, 4] cxcywh in [0, 1] of the image, sides in [0.05, 0.55] (like a sigmoid head's outputs)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    side = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.05
    return torch.cat([centre, side], dim=1).to(dtype)


# Pairs (pred, target) cxcywh with exact binary fractions, so that xyxy corners tie exactly in float32 and float64.
DEGENERATE = {
    "identical": ([0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]),
    "zero_width_pred": ([0.5, 0.5, 0.0, 0.25], [0.5, 0.5, 0.25, 0.25]),
    "zero_width_both": ([0.375, 0.5, 0.0, 0.25], [0.375, 0.5, 0.0, 0.25]),
    "zero_size_both": ([0.375, 0.5, 0.0, 0.0], [0.375, 0.5, 0.0, 0.0]),
    "disjoint": ([0.125, 0.125, 0.125, 0.125], [0.75, 0.75, 0.25, 0.25]),
    "touching": ([0.25, 0.5, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]),  # pred x2 == target x1: intersection width 0
    "touching_offset": ([0.25, 0.5, 0.25, 0.25], [0.5, 0.625, 0.25, 0.25]),  # the same, enclosing box > union
    "nested": ([0.5, 0.5, 0.125, 0.125], [0.5, 0.5, 0.5, 0.5]),
    "nested_shared_edge": ([0.375, 0.5, 0.25, 0.5], [0.5, 0.5, 0.5, 0.5]),  # same x1, y1, y2
    "shifted_same_size": ([0.5, 0.625, 0.25, 0.25], [0.5, 0.5, 0.25, 0.25]),  # same x1, x2
    "l1_zero_in_one_coord": ([0.5, 0.25, 0.375, 0.125], [0.5, 0.5, 0.25, 0.25]),
}


def degenerate_pairs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = zip(*DEGENERATE.values())
    return torch.tensor(pred, dtype=dtype), torch.tensor(target, dtype=dtype)


def oracle(pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float, reduction: str):
    """torch L1 + torchvision's GIoU loss (eps 1e-7, as ours) on xyxy boxes."""
    l1 = (pred - target).abs().sum(dim=-1)
    l1 = l1.mean() if reduction == "mean" else l1.sum()
    giou = tvops.generalized_box_iou_loss(
        tvops.box_convert(pred, "cxcywh", "xyxy"), tvops.box_convert(target, "cxcywh", "xyxy"), reduction=reduction
    )
    return {"l1": l1, "giou": giou, "total": l1_weight * l1 + giou_weight * giou}


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "degenerate"])
def test_values_match_torchvision_and_the_unfused_loss(case, dtype, reduction):
    if case == "random":
        pred, target = random_cxcywh(64, seed=1, dtype=dtype), random_cxcywh(64, seed=2, dtype=dtype)
    else:
        pred, target = degenerate_pairs(dtype)
    fused = fused_bbox_regression_loss(pred, target, 3.0, 1.5, reduction=reduction)
    expected = oracle(pred, target, 3.0, 1.5, reduction)
    unfused = bbox_regression_loss(pred, target, 3.0, 1.5, reduction=reduction)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for key in ("l1", "giou", "total"):
        assert fused[key].dtype == dtype and fused[key].shape == ()
        torch.testing.assert_close(fused[key], expected[key], **tolerance, msg=key)
        torch.testing.assert_close(fused[key], unfused[key], **tolerance, msg=key)
    if case == "degenerate":  # per pair, against values by hand (eps = 1e-7 on the union and the enclosing area)
        per_pair = dict(zip(DEGENERATE, (fused_bbox_regression_loss(p[None], t[None], 0.0, 1.0)["giou"].item()
                                         for p, t in zip(pred, target))))  # fmt: skip
        eps = 1e-7
        assert per_pair["identical"] == pytest.approx(1 - (1 / 16) / (1 / 16 + eps), abs=1e-7)
        assert per_pair["nested"] == pytest.approx(1 - (1 / 64) / (1 / 4 + eps), abs=1e-7)  # enclosing = union
        assert per_pair["touching"] == pytest.approx(1.0, abs=1e-7)  # IoU 0, enclosing = union
        assert per_pair["zero_size_both"] == pytest.approx(1.0, abs=1e-7)  # 0 / eps - 0 / eps
        # disjoint: I = 0, U = 1/64 + 1/16, C = (0.875 - 0.0625)^2
        assert per_pair["disjoint"] == pytest.approx(1 + (0.8125**2 - 5 / 64) / (0.8125**2 + eps), abs=1e-6)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_is_upcast_to_float32_and_gradients_keep_the_input_dtype(dtype):
    pred = random_cxcywh(16, seed=3, dtype=dtype).requires_grad_(True)
    target = random_cxcywh(16, seed=4, dtype=dtype)
    fused = fused_bbox_regression_loss(pred, target)
    unfused = bbox_regression_loss(pred, target)
    assert all(fused[k].dtype == torch.float32 for k in fused)
    torch.testing.assert_close(fused["total"], unfused["total"], rtol=1e-6, atol=1e-6)
    (grad_fused,) = torch.autograd.grad(fused["total"], pred)
    (grad_unfused,) = torch.autograd.grad(unfused["total"], pred)
    assert grad_fused.dtype == dtype
    torch.testing.assert_close(grad_fused, grad_unfused)


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------


def away_from_kinks(pred: torch.Tensor, target: torch.Tensor, margin: float) -> bool:
    """No coordinate of L1, no xyxy corner pair (max/min) and no intersection side within ``margin`` of a kink."""
    corners = [tvops.box_convert(b, "cxcywh", "xyxy") for b in (pred, target)]
    inter_sides = torch.minimum(corners[0][:, 2:], corners[1][:, 2:]) - torch.maximum(corners[0][:, :2],
                                                                                       corners[1][:, :2])  # fmt: skip
    gaps = torch.cat([(pred - target).abs(), (corners[0] - corners[1]).abs(), inter_sides.abs()], dim=1)
    return bool(gaps.min() > margin)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64_away_from_kinks(reduction):
    pred, target = random_cxcywh(12, seed=5), random_cxcywh(12, seed=6)
    assert away_from_kinks(pred, target, margin=1e-4)  # finite differences step 1e-6: no kink is crossed
    overlapping = (tvops.box_iou(*(tvops.box_convert(b, "cxcywh", "xyxy") for b in (pred, target))).diagonal() > 0)
    assert 0 < int(overlapping.sum()) < 12  # both GIoU regimes: overlapping pairs and disjoint ones
    pred.requires_grad_(True)
    target.requires_grad_(True)

    def terms(p, t):  # every output, so each of l1, giou and total is checked against finite differences
        out = fused_bbox_regression_loss(p, t, 3.0, 1.5, reduction=reduction)
        return out["l1"], out["giou"], out["total"]

    assert torch.autograd.gradcheck(terms, (pred, target), eps=1e-6, atol=1e-7, rtol=1e-5)


# Upstream gradients of (l1, giou, total): each output its own weight, so that a mistake in one term's chain cannot
# hide behind another; and each output alone (the others unused: their gradients reach the backward as None).
UPSTREAMS = {"all": {"l1": 0.7, "giou": -1.3, "total": 2.0}, "total": {"total": 1.0}, "l1": {"l1": 1.0},
             "giou": {"giou": 1.0}}  # fmt: skip


@pytest.mark.parametrize("upstream", list(UPSTREAMS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_equal_autograd_of_the_unfused_loss_with_ties(dtype, reduction, upstream):
    """Random boxes plus every DEGENERATE pair (exact corner ties, zero sides, touching edges, L1 differences of 0):
    at those points the fused backward must give what autograd gives for the unfused ops."""
    degenerate = degenerate_pairs(dtype)
    pred = torch.cat([random_cxcywh(20, seed=7, dtype=dtype), degenerate[0]]).requires_grad_(True)
    target = torch.cat([random_cxcywh(20, seed=8, dtype=dtype), degenerate[1]]).requires_grad_(True)
    weights = UPSTREAMS[upstream]

    def grads(loss_fn):
        out = loss_fn(pred, target, 3.0, 1.5, reduction=reduction)
        return torch.autograd.grad(sum(w * out[k] for k, w in weights.items()), (pred, target))

    fused, unfused = grads(fused_bbox_regression_loss), grads(bbox_regression_loss)
    # The zero-size pairs have gradients of order 1 / eps = 1e7 (GIoU of empty boxes): compare relative to the largest
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for name, ours, expected in zip(("pred", "target"), fused, unfused):
        scale = float(expected.abs().max())
        torch.testing.assert_close(ours, expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, msg=name)
    # Identical boxes tie at every corner: the loss is symmetric in its two boxes, so halving each max/min gradient
    # (autograd's convention) gives both boxes the same gradient, not zero (giving all of it to one box would not).
    for case in ("identical", "zero_width_both"):
        row = 20 + list(DEGENERATE).index(case)
        torch.testing.assert_close(fused[0][row], fused[1][row], msg=case)
        assert fused[0][row].abs().max() > 0 or upstream == "l1", case  # L1 at pred == target: sign 0


def test_one_graph_node_and_targets_without_grad():
    pred = random_cxcywh(8, seed=9).requires_grad_(True)
    target = random_cxcywh(8, seed=10)
    out = fused_bbox_regression_loss(pred, target)
    node = out["total"].grad_fn
    assert out["l1"].grad_fn is node and out["giou"].grad_fn is node  # one node gives all three terms
    assert [type(fn).__name__ for fn, _ in node.next_functions] == ["AccumulateGrad", "NoneType"]
    out["total"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0 and target.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Empty batches and bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float64))
def test_no_boxes_gives_graph_connected_zeros(dtype):
    pred = torch.zeros(0, 4, dtype=dtype, requires_grad=True)
    for reduction in (*REDUCTIONS, "anything"):  # as the unfused loss: an empty batch returns before the check
        out = fused_bbox_regression_loss(pred, torch.zeros(0, 4), reduction=reduction)
        assert {k: v.item() for k, v in out.items()} == {"l1": 0.0, "giou": 0.0, "total": 0.0}
        assert out["total"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out["total"].requires_grad
        out["total"].backward()
        assert pred.grad.shape == (0, 4)


def test_bad_input_is_refused_like_the_unfused_loss():
    pred, target = random_cxcywh(3, seed=11), random_cxcywh(3, seed=12)
    for loss_fn in (fused_bbox_regression_loss, bbox_regression_loss):
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
            loss_fn(pred, target, reduction="none")
        with pytest.raises(ValueError, match=r"equal shape, got \(3, 4\) and \(2, 4\)"):
            loss_fn(pred, target[:2])
        with pytest.raises(ValueError, match=r"boxes1 must be a Tensor\[N, 4\]"):
            loss_fn(pred[:, :3], target[:, :3])
