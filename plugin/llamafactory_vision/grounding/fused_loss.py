"""``bbox_fused_loss``: the bbox head's DETR loss as one autograd node with a hand-derived backward.

:func:`~llamafactory_vision.boxes.bbox_regression_loss` builds its loss from ~40 small autograd ops (L1, the
cxcywh -> xyxy conversion of both boxes, intersection, union, enclosing box, GIoU, reductions), each one recorded in
the graph, each one a kernel launch forward and again backward. :func:`fused_bbox_regression_loss` computes the same
terms with the same expressions in the same order in one :class:`torch.autograd.Function`: the forward runs without
recording a graph, and the backward is the closed-form gradient of L1 and of ``1 - GIoU`` with respect to both
boxes' ``cxcywh``. Values equal the unfused ones to float rounding (the forward repeats the unfused arithmetic);
gradients equal autograd's of the unfused code to rounding, including at its non-differentiable points.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from llamafactory_vision.boxes import _check_same_shape, _upcast

# The eps of boxes.elementwise_generalized_box_iou's default, which bbox_regression_loss uses: added to the union
# and to the enclosing area (tests/test_fused_loss.py compares the values with the unfused loss).
_EPS = 1e-7


def _giou_parts(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """The intermediate tensors of ``1 - GIoU`` for matched ``cxcywh`` pairs, as ``bbox_regression_loss`` computes them.

    ``pred``, ``target``: ``Tensor[N, 4]`` cxcywh of equal float dtype. Returns ``Tensor[N, 2]`` entries (x, y pairs)
    ``pred_lt``, ``pred_rb``, ``target_lt``, ``target_rb`` (xyxy corners), ``inter_raw`` / ``inter_wh`` (intersection
    sides before / after clamping at 0), ``enclose_raw`` / ``enclose_wh`` (the same for the enclosing box),
    ``pred_wh`` / ``target_wh`` (sides as ``x2 - x1``, ``y2 - y1``), and ``Tensor[N]`` ``inter``, ``union``,
    ``enclosing`` and ``giou_loss``.
    """
    parts = {}
    for name, box in (("pred", pred), ("target", target)):
        centre, half = box[:, :2], box[:, 2:] / 2  # boxes.box_convert: (cx - w / 2, ..., cx + w / 2, ...)
        parts[f"{name}_lt"], parts[f"{name}_rb"] = centre - half, centre + half
        parts[f"{name}_wh"] = parts[f"{name}_rb"] - parts[f"{name}_lt"]
    parts["inter_raw"] = torch.minimum(parts["pred_rb"], parts["target_rb"]) - torch.maximum(
        parts["pred_lt"], parts["target_lt"]
    )
    parts["inter_wh"] = parts["inter_raw"].clamp(min=0)
    parts["inter"] = parts["inter_wh"][:, 0] * parts["inter_wh"][:, 1]
    area_pred = parts["pred_wh"][:, 0] * parts["pred_wh"][:, 1]
    area_target = parts["target_wh"][:, 0] * parts["target_wh"][:, 1]
    parts["union"] = area_pred + area_target - parts["inter"]
    iou = parts["inter"] / (parts["union"] + _EPS)
    parts["enclose_raw"] = torch.maximum(parts["pred_rb"], parts["target_rb"]) - torch.minimum(
        parts["pred_lt"], parts["target_lt"]
    )
    parts["enclose_wh"] = parts["enclose_raw"].clamp(min=0)
    parts["enclosing"] = parts["enclose_wh"][:, 0] * parts["enclose_wh"][:, 1]
    parts["giou_loss"] = 1 - (iou - (parts["enclosing"] - parts["union"]) / (parts["enclosing"] + _EPS))
    return parts


def _giou_loss_grads(parts: dict[str, Tensor], upstream: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_i upstream[i] * (1 - GIoU_i)`` with respect to ``pred`` and ``target`` cxcywh.

    With ``I`` the intersection, ``U = A_pred + A_target - I`` the union, ``C`` the enclosing area and
    ``GIoU = I / (U + eps) - (C - U) / (C + eps)``::

        dGIoU/dU = 1 / (C + eps) - I / (U + eps)^2          (A_pred and A_target enter through U only)
        dGIoU/dI = 1 / (U + eps) - dGIoU/dU                  (I directly, and through U = ... - I)
        dGIoU/dC = -(U + eps) / (C + eps)^2

    then ``I = iw * ih`` and ``C = cw * ch`` (each side clamped at 0), ``A = w * h``, the corners through
    ``max`` / ``min`` of the two boxes' corners, and ``x1 = cx - w / 2``, ``x2 = cx + w / 2`` (same for y).
    Non-differentiable points follow autograd of the unfused ops: a side clamped at exactly 0 passes its gradient
    (``clamp(min=0)`` passes it where the input is ``>= 0``), and a ``max`` / ``min`` of two equal corners gives half
    of the gradient to each box (``torch.maximum`` / ``torch.minimum``).

    ``parts``: from :func:`_giou_parts`; ``upstream``: ``Tensor[N]``. Returns two ``Tensor[N, 4]`` (cxcywh).
    """
    union_eps, enclosing_eps = parts["union"] + _EPS, parts["enclosing"] + _EPS
    d_union = 1 / enclosing_eps - parts["inter"] / union_eps**2
    d_inter = 1 / union_eps - d_union
    d_enclosing = -union_eps / enclosing_eps**2
    # The loss is 1 - GIoU: every coefficient below carries the minus sign.
    c_inter, c_area, c_enclose = [(-upstream * d)[:, None] for d in (d_inter, d_union, d_enclosing)]
    g_inter_wh = c_inter * parts["inter_wh"].flip(-1) * (parts["inter_raw"] >= 0)  # dI/d(iw, ih) = (ih, iw)
    g_enclose_wh = c_enclose * parts["enclose_wh"].flip(-1) * (parts["enclose_raw"] >= 0)

    # Share of each max/min that goes to pred: 1 where pred's corner is taken, 0 where target's, 1/2 on a tie.
    # Intersection lt = max(pred_lt, target_lt) and rb = min(pred_rb, target_rb); the enclosing box the reverse.
    pred_lt_share = (parts["pred_lt"] > parts["target_lt"]) + 0.5 * (parts["pred_lt"] == parts["target_lt"])
    pred_rb_share = (parts["pred_rb"] < parts["target_rb"]) + 0.5 * (parts["pred_rb"] == parts["target_rb"])
    grads = []
    for name, lt_share, rb_share in (
        ("pred", pred_lt_share, pred_rb_share),
        ("target", 1 - pred_lt_share, 1 - pred_rb_share),
    ):
        g_wh = c_area * parts[f"{name}_wh"].flip(-1)  # dA/d(w, h) = (h, w), w = x2 - x1
        g_lt = -g_inter_wh * lt_share - g_enclose_wh * (1 - lt_share) - g_wh
        g_rb = g_inter_wh * rb_share + g_enclose_wh * (1 - rb_share) + g_wh
        grads.append(torch.cat((g_lt + g_rb, (g_rb - g_lt) / 2), dim=-1))  # (x1, x2) -> (cx, w), same for y
    return grads[0], grads[1]


class _FusedBBoxLoss(torch.autograd.Function):
    """``(pred, target) -> (l1, giou, total)``, see :func:`fused_bbox_regression_loss` (``N >= 1`` here)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, pred_cxcywh: Tensor, target_cxcywh: Tensor, l1_weight: float, giou_weight: float,
        reduction: str,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        pred = _upcast(pred_cxcywh)
        target = target_cxcywh.to(pred.dtype)
        diff = pred - target
        parts = _giou_parts(pred, target)
        l1_rows, giou_rows = diff.abs().sum(dim=-1), parts["giou_loss"]
        if reduction == "mean":
            l1, giou = l1_rows.mean(), giou_rows.mean()
        else:
            l1, giou = l1_rows.sum(), giou_rows.sum()
        ctx.part_names = tuple(parts)
        ctx.save_for_backward(diff, *parts.values())
        ctx.settings = (l1_weight, giou_weight, reduction, pred_cxcywh.dtype, target_cxcywh.dtype)
        return l1, giou, l1_weight * l1 + giou_weight * giou

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_l1: Tensor, grad_giou: Tensor, grad_total: Tensor):
        diff, *saved = ctx.saved_tensors
        parts = dict(zip(ctx.part_names, saved))
        l1_weight, giou_weight, reduction, pred_dtype, target_dtype = ctx.settings
        boxes = diff.shape[0]
        scale = 1 / boxes if reduction == "mean" else 1.0
        # total = l1_weight * l1 + giou_weight * giou: each term's upstream gradient, per box.
        up_l1 = (grad_l1 + l1_weight * grad_total) * scale
        up_giou = (grad_giou + giou_weight * grad_total) * scale
        grad_pred, grad_target = _giou_loss_grads(parts, up_giou.expand(boxes))
        sign = torch.sign(diff) * up_l1  # d|x|/dx: sign(x), 0 at x = 0 (autograd's abs gives sgn too)
        grad_pred = (grad_pred + sign).to(pred_dtype) if ctx.needs_input_grad[0] else None
        grad_target = (grad_target - sign).to(target_dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None, None


def fused_bbox_regression_loss(
    pred_cxcywh: Tensor,
    target_cxcywh: Tensor,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> dict[str, Tensor]:
    """DETR box loss ``l1_weight * L1 + giou_weight * (1 - GIoU)`` as one autograd node (``bbox_fused_loss: true``).

    Same arguments, checks, dtypes and results as :func:`~llamafactory_vision.boxes.bbox_regression_loss` (DETR,
    Carion et al., ECCV 2020; GIoU, Rezatofighi et al., CVPR 2019), with ``eps = 1e-7`` added to the union and to the
    enclosing area as there; values equal to float rounding (the forward repeats its arithmetic).

    Gradients are closed-form (see :func:`_giou_loss_grads`) and flow to both inputs (targets usually need none).
    Where the loss is not differentiable they are those autograd gives for the unfused code: ``|x|`` at 0 gives 0; an
    intersection or enclosing side of exactly 0 passes its gradient (``clamp(min=0)``); two equal corners share a
    ``max`` / ``min`` gradient half and half. The node is differentiable once (no double backward).

    Args:
        pred_cxcywh (Tensor[N, 4]): predicted ``(cx, cy, w, h)`` in ``[0, 1]`` of the image (any float dtype).
        target_cxcywh (Tensor[N, 4]): target boxes, same format.
        l1_weight (float): weight of the L1 term. Default ``5.0``.
        giou_weight (float): weight of the GIoU term. Default ``2.0``.
        reduction (str): ``"mean"`` or ``"sum"`` over boxes. Default ``"mean"``.

    Returns:
        dict[str, Tensor]: scalars ``l1`` (L1 summed over the 4 coordinates, reduced over boxes), ``giou``
        (``1 - GIoU`` reduced over boxes) and ``total`` (the weighted sum), float32 (float64 for float64 inputs);
        their gradients reach the inputs in the inputs' dtypes. ``N = 0`` gives zeros connected to ``pred_cxcywh``'s
        graph.
    """
    _check_same_shape(pred_cxcywh, target_cxcywh)
    if pred_cxcywh.shape[0] == 0:  # as bbox_regression_loss: checked before the reduction
        zero = _upcast(pred_cxcywh).sum() * 0.0
        return {"l1": zero, "giou": zero, "total": zero}
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    l1, giou, total = _FusedBBoxLoss.apply(pred_cxcywh, target_cxcywh, l1_weight, giou_weight, reduction)
    return {"l1": l1, "giou": giou, "total": total}
