"""Box math: formats, validation, normalisation, IoU / GIoU, the bbox loss and the Qwen-VL resize arithmetic.

Conventions (torchvision.ops style):

- ``xyxy``: ``(x1, y1, x2, y2)``, top-left and bottom-right corners, ``0 <= x1 < x2`` and ``0 <= y1 < y2``.
- ``xywh``: ``(x1, y1, w, h)``, top-left corner plus width and height (COCO, RefCOCO).
- ``cxcywh``: ``(cx, cy, w, h)``, centre plus width and height (DETR, our bbox head).

Everything is converted through ``xyxy``. Pixel boxes live on the *original* image; the neutral representation
used across the package is ``xyxy`` normalised to ``[0, 1]`` by the original ``(width, height)``, which a resize
without cropping leaves unchanged. Sizes are always ``(width, height)`` except where a function mirrors a host
signature that uses ``(height, width)`` (``smart_resize``), which its docstring states.

Only plain Python and torch are needed here; nothing imports LLaMA-Factory or transformers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")

# Defaults of LLaMA-Factory 0.9.5 `MMPluginMixin._get_mm_inputs` (`getattr(processor, "image_max_pixels", ...)`).
HOST_IMAGE_MAX_PIXELS = 768 * 768
HOST_IMAGE_MIN_PIXELS = 32 * 32

# Hard-coded in LLaMA-Factory's `Qwen2VLPlugin._preprocess_image` (also used by its Qwen2.5/Qwen3-VL subclasses).
_QWEN_MIN_SIDE = 28
_QWEN_MAX_ASPECT = 200
_QWEN_ASPECT_FIX = 180


class BoxError(ValueError):
    """A box that cannot be used.

    Attributes:
        field (str): name of the offending argument or data field, e.g. ``"objects[2].bbox"``.
        reason (str): machine-readable key: ``"not_a_sequence"``, ``"wrong_length"``, ``"not_numeric"``,
            ``"not_finite"``, ``"unknown_format"``, ``"degenerate"``, ``"outside_image"`` or ``"bad_image_size"``.
    """

    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(f"{field}: {message} [{reason}]")
        self.field = field
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Pickle rebuilds an exception as `cls(*self.args)`, which holds only the formatted text; errors must survive
        # the trip from a dataset worker process to the parent (`preprocessing_num_workers > 1`).
        return type(self), (self.field, self.reason, self.message)


# ----------------------------------------------------------------------------------------------------------------
# Python-level boxes (data entry): validated once, where data enters.
# ----------------------------------------------------------------------------------------------------------------


def _check_format(fmt: str, field: str) -> None:
    if fmt not in BOX_FORMATS:
        raise BoxError(field, "unknown_format", f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")


def _check_image_size(image_size: Sequence[int], field: str) -> tuple[int, int]:
    if (
        len(image_size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in image_size)
        or min(image_size) <= 0
    ):
        raise BoxError(
            field, "bad_image_size", f"image size must be two positive ints (width, height), got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def to_xyxy(box: Sequence[Any], fmt: str = "xyxy", field: str = "box") -> tuple[float, float, float, float]:
    """Validate a box given as 4 numbers in ``fmt`` and return it as ``xyxy`` Python floats.

    Args:
        box (Sequence[Real]): 4 finite real numbers (bools and strings are refused), any units.
        fmt (str): one of ``BOX_FORMATS``. Default ``"xyxy"``.
        field (str): name used in the error. Default ``"box"``.

    Returns:
        tuple[float, float, float, float]: ``(x1, y1, x2, y2)`` in the units of ``box``. Corner order is not checked.

    Raises:
        BoxError: reason ``unknown_format``, ``not_a_sequence``, ``wrong_length``, ``not_numeric`` or ``not_finite``.
    """
    _check_format(fmt, "fmt")
    # Exact lists/tuples of exact ints/floats (boxes loaded from JSON) skip the abstract-class checks, which cost
    # more than the rest of the function; the outcome is the same.
    if type(box) is list or type(box) is tuple:
        values = list(box)
    elif isinstance(box, (str, bytes)) or not isinstance(box, (Sequence, Tensor)) and not hasattr(box, "__array__"):
        raise BoxError(field, "not_a_sequence", f"expected a sequence of 4 numbers, got {type(box).__name__} {box!r}")
    else:
        values = box.tolist() if hasattr(box, "tolist") else list(box)
    if not isinstance(values, list):  # a 0-d array or tensor
        raise BoxError(field, "not_a_sequence", f"expected a sequence of 4 numbers, got the scalar {values!r}")
    if len(values) != 4:
        raise BoxError(field, "wrong_length", f"expected 4 numbers, got {len(values)}: {values!r}")
    for value in values:
        if (
            type(value) is not float
            and type(value) is not int
            and (isinstance(value, bool) or not isinstance(value, numbers.Real))
        ):
            raise BoxError(
                field, "not_numeric", f"expected numbers, got {type(value).__name__} {value!r} in {values!r}"
            )
        if not math.isfinite(value):
            raise BoxError(field, "not_finite", f"expected finite numbers, got {values!r}")

    a, b, c, d = map(float, values)
    if fmt == "xywh":
        return a, b, a + c, b + d
    if fmt == "cxcywh":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    return a, b, c, d


def from_xyxy(box_xyxy: Sequence[float], fmt: str) -> tuple[float, float, float, float]:
    """Write an ``xyxy`` box (4 floats, any units) in ``fmt`` (one of ``BOX_FORMATS``); the inverse of :func:`to_xyxy`."""
    _check_format(fmt, "fmt")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if fmt == "xywh":
        return x1, y1, x2 - x1, y2 - y1
    if fmt == "cxcywh":
        return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    return x1, y1, x2, y2


def validate_pixel_box(
    box: Sequence[Any], fmt: str, image_size: tuple[int, int], field: str = "box"
) -> tuple[float, float, float, float]:
    """Validate a pixel box on the original image; never clamps.

    Args:
        box (Sequence[Real]): 4 numbers in ``fmt``, pixels of the original image.
        fmt (str): one of ``BOX_FORMATS``.
        image_size (tuple[int, int]): ``(width, height)`` of the original image in pixels.
        field (str): name used in the error. Default ``"box"``.

    Returns:
        tuple[float, float, float, float]: ``xyxy`` pixels with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.

    Raises:
        BoxError: any reason of :func:`to_xyxy`, ``bad_image_size``, ``degenerate`` (zero or negative width or
            height) or ``outside_image`` (a coordinate outside ``[0, W]`` / ``[0, H]``).
    """
    width, height = _check_image_size(image_size, "image_size")
    x1, y1, x2, y2 = to_xyxy(box, fmt, field)
    if not (x1 < x2 and y1 < y2):
        raise BoxError(field, "degenerate", f"box {list(box)!r} ({fmt}) has xyxy {(x1, y1, x2, y2)} with no area")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise BoxError(
            field,
            "outside_image",
            f"box {list(box)!r} ({fmt}) has xyxy {(x1, y1, x2, y2)} outside the {width}x{height} image",
        )
    return x1, y1, x2, y2


def normalize_xyxy(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Pixel ``xyxy`` -> ``xyxy`` in ``[0, 1]`` of the image: ``(x1 / W, y1 / H, x2 / W, y2 / H)``.

    Args:
        box_xyxy (Sequence[float]): ``(x1, y1, x2, y2)`` in pixels, e.g. from :func:`validate_pixel_box`.
        image_size (tuple[int, int]): ``(width, height)`` in pixels.
    """
    width, height = _check_image_size(image_size, "image_size")
    x1, y1, x2, y2 = box_xyxy
    return x1 / width, y1 / height, x2 / width, y2 / height


def denormalize_xyxy(box_norm: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Normalised ``xyxy`` in ``[0, 1]`` -> pixel ``xyxy`` of an image of ``image_size = (width, height)``."""
    width, height = _check_image_size(image_size, "image_size")
    x1, y1, x2, y2 = box_norm
    return x1 * width, y1 * height, x2 * width, y2 * height


# ----------------------------------------------------------------------------------------------------------------
# Tensor ops (differentiable).
# ----------------------------------------------------------------------------------------------------------------


def _upcast(t: Tensor) -> Tensor:
    # Areas of half-precision boxes overflow (fp16) or lose all precision (bf16): compute in float32 at least.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_boxes(t: Tensor, name: str) -> None:
    if t.ndim != 2 or t.shape[-1] != 4:
        raise ValueError(f"{name} must be a Tensor[N, 4], got shape {tuple(t.shape)}")


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    _check_boxes(a, "boxes1")
    _check_boxes(b, "boxes2")
    if a.shape != b.shape:
        raise ValueError(
            f"element-wise ops need boxes1 and boxes2 of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``Tensor[..., 4]`` boxes between ``BOX_FORMATS`` (through ``xyxy``); keeps dtype and graph.

    Args:
        boxes (Tensor[..., 4]): boxes in ``in_fmt``.
        in_fmt (str), out_fmt (str): one of ``"xyxy"``, ``"xywh"``, ``"cxcywh"``.

    Returns:
        Tensor[..., 4]: boxes in ``out_fmt``, same dtype and device.
    """
    _check_format(in_fmt, "in_fmt")
    _check_format(out_fmt, "out_fmt")
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have a last dimension of 4, got shape {tuple(boxes.shape)}")
    if in_fmt == out_fmt:
        return boxes.clone()

    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        c, d = a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    # (a, b, c, d) is now xyxy.
    if out_fmt == "xywh":
        return torch.stack((a, b, c - a, d - b), dim=-1)
    if out_fmt == "cxcywh":
        return torch.stack(((a + c) / 2, (b + d) / 2, c - a, d - b), dim=-1)
    return torch.stack((a, b, c, d), dim=-1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise IoU of two sets of ``xyxy`` boxes.

    Args:
        boxes1 (Tensor[N, 4]): ``(x1, y1, x2, y2)`` with ``x1 <= x2``, ``y1 <= y2``.
        boxes2 (Tensor[M, 4]): same format.
        eps (float): added to the union so that empty boxes give 0 instead of NaN. Default ``1e-7``.

    Returns:
        Tensor[N, M]: IoU of every pair, float32 (float64 if an input is float64).
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(boxes1)[:, None] + _area(boxes2)[None, :] - inter
    return inter / (union + eps)


def _elementwise_iou_parts(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(iou, union, enclosing_area)`` for matched pairs of upcast ``xyxy`` boxes, each ``Tensor[N]``."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = _area(boxes1) + _area(boxes2) - inter
    iou = inter / (union + eps)

    lt_c = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb_c = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    return iou, union, wh_c[:, 0] * wh_c[:, 1]


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of matched pairs ``boxes1[i]``, ``boxes2[i]``.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[N, 4]): ``xyxy`` boxes, ``x1 <= x2``, ``y1 <= y2``.
        eps (float): added to the union. Default ``1e-7``.

    Returns:
        Tensor[N]: IoU per pair, float32 (float64 if an input is float64).
    """
    _check_same_shape(boxes1, boxes2)
    return _elementwise_iou_parts(_upcast(boxes1), _upcast(boxes2), eps)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU of matched pairs: ``IoU - (C - U) / C`` with ``C`` the smallest enclosing box's area.

    Rezatofighi et al., "Generalized Intersection over Union: A Metric and A Loss for Bounding Box Regression",
    CVPR 2019, https://arxiv.org/abs/1902.09630.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[N, 4]): ``xyxy`` boxes, ``x1 <= x2``, ``y1 <= y2``.
        eps (float): added to the union and to ``C``. Default ``1e-7``.

    Returns:
        Tensor[N]: GIoU per pair in ``[-1, 1]``, float32 (float64 if an input is float64).
    """
    _check_same_shape(boxes1, boxes2)
    iou, union, enclosing = _elementwise_iou_parts(_upcast(boxes1), _upcast(boxes2), eps)
    return iou - (enclosing - union) / (enclosing + eps)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        # mean() of an empty tensor is NaN; an empty batch must give a zero still connected to the graph.
        return loss.mean() if loss.numel() > 0 else loss.sum() * 0.0
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def generalized_box_iou_loss(
    boxes1: Tensor,
    boxes2: Tensor,
    reduction: Literal["none", "mean", "sum"] = "none",
    eps: float = 1e-7,
) -> Tensor:
    """GIoU loss ``1 - GIoU`` of matched pairs (Rezatofighi et al., CVPR 2019, https://arxiv.org/abs/1902.09630).

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[N, 4]): ``xyxy`` boxes, ``x1 <= x2``, ``y1 <= y2``.
        reduction (str): ``"none"`` -> ``Tensor[N]``; ``"mean"`` / ``"sum"`` -> scalar (``N = 0`` gives a zero
            connected to the inputs' graph). Default ``"none"``.
        eps (float): see :func:`elementwise_generalized_box_iou`. Default ``1e-7``.

    Returns:
        Tensor: loss in ``[0, 2]``, float32 (float64 if an input is float64).
    """
    return _reduce(1 - elementwise_generalized_box_iou(boxes1, boxes2, eps), reduction)


def bbox_regression_loss(
    pred_cxcywh: Tensor,
    target_cxcywh: Tensor,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> dict[str, Tensor]:
    """DETR box loss ``l1_weight * L1 + giou_weight * (1 - GIoU)``.

    Weights from DETR (Carion et al., ECCV 2020); GIoU from Rezatofighi et al., CVPR 2019.

    Args:
        pred_cxcywh (Tensor[N, 4]): predicted ``(cx, cy, w, h)`` in ``[0, 1]`` of the image (any float dtype).
        target_cxcywh (Tensor[N, 4]): target boxes, same format.
        l1_weight (float): weight of the L1 term. Default ``5.0``.
        giou_weight (float): weight of the GIoU term. Default ``2.0``.
        reduction (str): ``"mean"`` over boxes, or ``"sum"`` over boxes (for a caller that divides by a box count
            taken over several batches or processes). Default ``"mean"``.

    Returns:
        dict[str, Tensor]: float32 scalars ``l1`` (L1 summed over the 4 coordinates, reduced over boxes), ``giou``
        (``1 - GIoU`` reduced over boxes) and ``total`` (the weighted sum). ``N = 0`` gives zeros connected to
        ``pred_cxcywh``'s graph.
    """
    _check_same_shape(pred_cxcywh, target_cxcywh)
    pred = _upcast(pred_cxcywh)
    target = target_cxcywh.to(pred.dtype)
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0
        return {"l1": zero, "giou": zero, "total": zero}

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    l1 = _reduce((pred - target).abs().sum(dim=-1), reduction)
    giou = generalized_box_iou_loss(
        box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"), reduction=reduction
    )
    return {"l1": l1, "giou": giou, "total": l1_weight * l1 + giou_weight * giou}


# ----------------------------------------------------------------------------------------------------------------
# Resize arithmetic: the size a Qwen-VL model sees, computed from the original size alone.
# ----------------------------------------------------------------------------------------------------------------


def _positive_size(width: int, height: int, step: str) -> tuple[int, int]:
    # PIL's Image.resize raises on a zero side, so the host fails here too; say where and why.
    if width <= 0 or height <= 0:
        raise ValueError(f"{step} gives an empty image of {width}x{height} (width x height); the host's resize fails")
    return width, height


def host_preprocess_size(
    width: int,
    height: int,
    image_max_pixels: int = HOST_IMAGE_MAX_PIXELS,
    image_min_pixels: int = HOST_IMAGE_MIN_PIXELS,
) -> tuple[int, int]:
    """Size after LLaMA-Factory 0.9.5's own resize for Qwen-VL models (before the HF image processor).

    Mirrors ``MMPluginMixin._preprocess_image`` then ``Qwen2VLPlugin._preprocess_image`` (shared by the Qwen2.5-VL
    and Qwen3-VL plugins), step by step and with the same float expressions and ``int`` truncation:

    1. more than ``image_max_pixels``: scale both sides by ``sqrt(image_max_pixels / (W * H))``, truncate;
    2. fewer than ``image_min_pixels``: scale by ``sqrt(image_min_pixels / (W * H))``, truncate;
    3. a side under 28: raise it to 28 (the other side is kept, so the aspect ratio changes);
    4. ``W / H > 200``: ``W = 180 * H``; then ``H / W > 200``: ``H = 180 * W`` (crops the aspect, not the image:
       the host *resizes*, so normalised boxes stay valid).

    PIL's ``Image.resize((w, h))`` returns exactly ``(w, h)``, so these ints are the real pixel sizes.

    Args:
        width (int), height (int): original image size in pixels.
        image_max_pixels (int): ``processor.image_max_pixels``. Default ``768 * 768`` (the host's default).
        image_min_pixels (int): ``processor.image_min_pixels``. Default ``32 * 32`` (the host's default).

    Returns:
        tuple[int, int]: ``(width, height)`` in pixels handed to the image processor.

    Raises:
        ValueError: a non-positive input, or step 1 truncates a side to 0 (the host's PIL resize raises then too).
    """
    _positive_size(width, height, "the input size")
    if width * height > image_max_pixels:
        resize_factor = math.sqrt(image_max_pixels / (width * height))
        width, height = _positive_size(
            int(width * resize_factor), int(height * resize_factor), f"image_max_pixels={image_max_pixels}"
        )
    if width * height < image_min_pixels:
        resize_factor = math.sqrt(image_min_pixels / (width * height))
        width, height = int(width * resize_factor), int(height * resize_factor)

    if min(width, height) < _QWEN_MIN_SIDE:
        width, height = max(width, _QWEN_MIN_SIDE), max(height, _QWEN_MIN_SIDE)
    if width / height > _QWEN_MAX_ASPECT:
        width = height * _QWEN_ASPECT_FIX
    if height / width > _QWEN_MAX_ASPECT:
        height = width * _QWEN_ASPECT_FIX
    return width, height


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Size chosen by the Qwen2-VL image processor (transformers 5.6 ``smart_resize``), as ``(height, width)``.

    Both sides become multiples of ``factor`` (``patch_size * merge_size``: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL),
    rounded to the nearest multiple; if that exceeds ``max_pixels`` the image is scaled down by
    ``sqrt(H * W / max_pixels)`` and floored to multiples (at least ``factor``); if it is under ``min_pixels`` it is
    scaled up by ``sqrt(min_pixels / (H * W))`` and ceiled to multiples.

    ``qwen_vl_utils.smart_resize`` differs in two corners: a side of at most ``factor / 2`` rounds to 0 here (and
    the image is then scaled up through the ``min_pixels`` branch) but is raised to ``factor`` there; and there a
    downscaled side may floor to 0. After :func:`host_preprocess_size` every side is at least 28, so the first
    corner cannot occur for ``factor <= 56``; the second needs a very elongated image and a small ``max_pixels``.

    Args:
        height (int), width (int): input size in pixels (note the ``(height, width)`` order, as in transformers).
        factor (int): ``patch_size * merge_size``. Default 28.
        min_pixels (int): ``image_processor.size["shortest_edge"]``. Default ``56 * 56``.
        max_pixels (int): ``image_processor.size["longest_edge"]``. Default ``28 * 28 * 1280``.

    Returns:
        tuple[int, int]: ``(height, width)`` in pixels, multiples of ``factor``.

    Raises:
        ValueError: a non-positive side, or an aspect ratio above 200 (as transformers does).
    """
    _positive_size(width, height, "the input size")
    if max(height, width) / min(height, width) > _QWEN_MAX_ASPECT:
        raise ValueError(
            f"aspect ratio of a {width}x{height} (width x height) image exceeds {_QWEN_MAX_ASPECT}; "
            "the Qwen-VL image processor refuses it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_view_size(width: int, height: int, processor: Any) -> tuple[int, int]:
    """Size of the image as a Qwen-VL model sees it, read from the same settings LLaMA-Factory 0.9.5 uses.

    Composes :func:`host_preprocess_size` (``processor.image_max_pixels`` / ``image_min_pixels``, host defaults when
    absent) with :func:`smart_resize` (``processor.image_processor``'s ``patch_size * merge_size`` and
    ``size["shortest_edge"]`` / ``size["longest_edge"]``, the min/max pixels in transformers 5.x). Equals
    ``image_grid_thw[i][1:] * patch_size`` of the real pipeline, reordered to ``(width, height)``.

    Args:
        width (int), height (int): original image size in pixels.
        processor: a multimodal processor with an ``image_processor`` attribute (a Qwen2-VL-style image processor).

    Returns:
        tuple[int, int]: ``(width, height)`` in pixels of the model-view image.

    Raises:
        ValueError: no image processor, resizing disabled, or a size the host itself cannot process.
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError(f"processor {type(processor).__name__} has no image_processor")
    if not getattr(image_processor, "do_resize", True):
        raise ValueError(f"{type(image_processor).__name__}.do_resize is False; the model view size is not defined")

    host_width, host_height = host_preprocess_size(
        width,
        height,
        image_max_pixels=getattr(processor, "image_max_pixels", HOST_IMAGE_MAX_PIXELS),
        image_min_pixels=getattr(processor, "image_min_pixels", HOST_IMAGE_MIN_PIXELS),
    )
    size = image_processor.size
    model_height, model_width = smart_resize(
        host_height,
        host_width,
        factor=image_processor.patch_size * image_processor.merge_size,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )
    return model_width, model_height
