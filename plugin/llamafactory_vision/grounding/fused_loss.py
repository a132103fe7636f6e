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

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from llamafactory_vision.boxes import _check_same_shape, _upcast

# The eps of boxes.elementwise_generalized_box_iou's default, which bbox_regression_loss uses: added to the union
# and to the enclosing area (tests/test_fused_loss.py compares the values with the unfused loss).
_EPS = 1e-7


class _Parts(NamedTuple):
    """What the backward needs of the forward's ``1 - GIoU``; index 0 of the ``[2, ...]`` tensors is pred, 1 target."""

    lt: Tensor  # Tensor[2, N, 2]: (x1, y1) of each box
    rb: Tensor  # Tensor[2, N, 2]: (x2, y2)
    wh: Tensor  # Tensor[2, N, 2]: (x2 - x1, y2 - y1)
    inter_raw: Tensor  # Tensor[N, 2]: intersection sides before clamping at 0
    inter_wh: Tensor  # Tensor[N, 2]: after
    enclose_raw: Tensor  # Tensor[N, 2]: enclosing box sides before clamping at 0
    enclose_wh: Tensor  # Tensor[N, 2]: after
    inter: Tensor  # Tensor[N]: intersection area
    union: Tensor  # Tensor[N]
    enclosing: Tensor  # Tensor[N]: enclosing box area


def _giou_loss(pred: Tensor, target: Tensor) -> tuple[Tensor, _Parts]:
    """``1 - GIoU`` of matched ``cxcywh`` pairs (``Tensor[N, 4]`` each, equal float dtype) -> ``Tensor[N]``, and its
    parts. The same expressions as ``bbox_regression_loss`` evaluates (``box_convert``, ``_elementwise_iou_parts``),
    on both boxes at once (stacked), so the values are the same floats."""
    boxes = torch.stack((pred, target))
    half = boxes[..., 2:] / 2  # box_convert: (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    lt, rb = boxes[..., :2] - half, boxes[..., :2] + half
    wh = rb - lt
    inter_raw = rb.amin(dim=0) - lt.amax(dim=0)
    inter_wh = inter_raw.clamp(min=0)
    inter = inter_wh.prod(dim=-1)
    areas = wh.prod(dim=-1)
    union = areas[0] + areas[1] - inter
    enclose_raw = rb.amax(dim=0) - lt.amin(dim=0)
    enclose_wh = enclose_raw.clamp(min=0)
    enclosing = enclose_wh.prod(dim=-1)
    iou = inter / (union + _EPS)
    loss = 1 - (iou - (enclosing - union) / (enclosing + _EPS))
    return loss, _Parts(lt, rb, wh, inter_raw, inter_wh, enclose_raw, enclose_wh, inter, union, enclosing)


def _giou_loss_grads(parts: _Parts, upstream: Tensor) -> Tensor:
    """Gradients of ``upstream * sum_i (1 - GIoU_i)`` with respect to both boxes: ``Tensor[2, N, 4]`` cxcywh (index 0
    pred, 1 target); ``upstream`` a scalar tensor.

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
    """
    union_eps, enclosing_eps = parts.union + _EPS, parts.enclosing + _EPS
    d_union = 1 / enclosing_eps - parts.inter / union_eps**2
    d_inter = 1 / union_eps - d_union
    d_enclosing = -union_eps / enclosing_eps**2
    # The loss is 1 - GIoU: the coefficients carry the minus sign. Each Tensor[N, 1].
    c_inter, c_area, c_enclose = (-upstream * torch.stack((d_inter, d_union, d_enclosing)))[..., None]
    g_inter_wh = c_inter * parts.inter_wh.flip(-1) * (parts.inter_raw >= 0)  # dI/d(iw, ih) = (ih, iw)
    g_enclose_wh = c_enclose * parts.enclose_wh.flip(-1) * (parts.enclose_raw >= 0)
    g_area_wh = c_area * parts.wh.flip(-1)  # dA/d(w, h) = (h, w), w = x2 - x1; Tensor[2, N, 2]

    # Each box's share of a max/min: 1 where its corner is taken, 0 where the other's, 1/2 on a tie. The
    # intersection takes max of the lt corners and min of the rb corners, the enclosing box the reverse (1 - share).
    lt_other, rb_other = parts.lt.flip(0), parts.rb.flip(0)
    lt_share = (parts.lt > lt_other) + 0.5 * (parts.lt == lt_other)
    rb_share = (parts.rb < rb_other) + 0.5 * (parts.rb == rb_other)
    inter_minus_enclose = g_inter_wh - g_enclose_wh
    g_lt = -(g_enclose_wh + inter_minus_enclose * lt_share + g_area_wh)  # lt enters the sides with a minus
    g_rb = g_enclose_wh + inter_minus_enclose * rb_share + g_area_wh
    return torch.cat((g_lt + g_rb, (g_rb - g_lt) / 2), dim=-1)  # (x1, x2) -> (cx, w), same for y


def _upstream(grad_term: Tensor | None, grad_total: Tensor | None, weight: float) -> Tensor | float:
    """The gradient reaching one term (``l1`` or ``giou``): its own plus ``weight`` times ``total``'s (None = 0)."""
    upstream = 0.0 if grad_total is None else weight * grad_total
    return upstream if grad_term is None else grad_term + upstream


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
        giou_rows, parts = _giou_loss(pred, target)
        l1_rows = diff.abs().sum(dim=-1)
        if reduction == "mean":
            l1, giou = l1_rows.mean(), giou_rows.mean()
        else:
            l1, giou = l1_rows.sum(), giou_rows.sum()
        ctx.save_for_backward(diff, *parts)
        ctx.set_materialize_grads(False)  # unused outputs (the trainer backpropagates `total` only) pass None
        ctx.settings = (l1_weight, giou_weight, reduction, pred_cxcywh.dtype, target_cxcywh.dtype)
        return l1, giou, l1_weight * l1 + giou_weight * giou

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_l1: Tensor, grad_giou: Tensor, grad_total: Tensor):
        diff, *parts = ctx.saved_tensors
        l1_weight, giou_weight, reduction, pred_dtype, target_dtype = ctx.settings
        scale = 1 / diff.shape[0] if reduction == "mean" else 1.0
        # total = l1_weight * l1 + giou_weight * giou: each term's upstream gradient, per box.
        up_l1 = _upstream(grad_l1, grad_total, l1_weight) * scale
        up_giou = _upstream(grad_giou, grad_total, giou_weight) * scale
        grad_pred, grad_target = _giou_loss_grads(_Parts(*parts), up_giou)
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
        (``1 - GIoU`` reduced over boxes) and ``total`` (the weighted sum), float32 (float64 when ``pred_cxcywh``
        is float64; the target is cast to that dtype, half precision is upcast); their gradients reach the inputs in
        the inputs' dtypes. ``N = 0`` gives zeros connected to ``pred_cxcywh``'s graph.
    """
    _check_same_shape(pred_cxcywh, target_cxcywh)
    if pred_cxcywh.shape[0] == 0:  # as bbox_regression_loss: checked before the reduction
        zero = _upcast(pred_cxcywh).sum() * 0.0
        return {"l1": zero, "giou": zero, "total": zero}
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    l1, giou, total = _FusedBBoxLoss.apply(pred_cxcywh, target_cxcywh, l1_weight, giou_weight, reduction)
    return {"l1": l1, "giou": giou, "total": total}
