"""Draw grounding boxes onto images, for eval reports and data previews."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from PIL import Image, ImageColor, ImageDraw, ImageFont


def _line_width(size: tuple[int, int]) -> int:
    """Outline width in pixels: about 0.4% of the longer side, at least 1."""
    return max(1, round(max(size) / 250))


def _font_size(size: tuple[int, int]) -> int:
    """Label font size in pixels: about 3% of the longer side, at least 10 so it stays legible on tiny images."""
    return max(10, round(max(size) / 32))


def _text_color(fill: tuple[int, ...]) -> str:
    """Black or white, whichever reads better on ``fill`` (ITU-R BT.601 luma)."""
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return "black" if luma > 140 else "white"


def draw_boxes(
    image: Image.Image,
    boxes_xyxy_pixels: Sequence[Sequence[float]],
    color: str | tuple[int, int, int],
    labels: Sequence[str | None] | None = None,
    caption_at: Literal["top", "bottom"] = "top",
) -> Image.Image:
    """Return a copy of ``image`` (as RGB) with ``boxes_xyxy_pixels`` outlined in ``color``.

    Args:
        image: any PIL image; it is not modified.
        boxes_xyxy_pixels: ``N`` boxes ``(x1, y1, x2, y2)`` in pixels of ``image``. Inverted corners are drawn as
            the rectangle they span, parts outside the image are cut off, boxes with a non-finite coordinate are
            skipped.
        color: a PIL colour name or RGB tuple.
        labels: optional ``N`` captions, drawn on a ``color`` tab at each box's edge; ``None`` entries get none.
        caption_at: ``"top"`` puts the tab above the box (inside it when the image ends there), ``"bottom"`` below
            it (or inside), so two sets of boxes drawn on one image keep their captions apart. Default ``"top"``.

    Line width and font size scale with the image so boxes stay visible on large images and legible on small ones.
    """
    if caption_at not in ("top", "bottom"):
        raise ValueError(f"caption_at must be 'top' or 'bottom', got {caption_at!r}")
    if labels is not None and len(labels) != len(boxes_xyxy_pixels):
        raise ValueError(f"labels has {len(labels)} entries but boxes_xyxy_pixels has {len(boxes_xyxy_pixels)}")
    out = image.convert("RGB")  # convert always returns a new image
    draw = ImageDraw.Draw(out)
    width = _line_width(out.size)
    margin = width + 1
    font = ImageFont.load_default(size=_font_size(out.size))
    rgb = ImageColor.getrgb(color) if isinstance(color, str) else tuple(color)
    for i, box in enumerate(boxes_xyxy_pixels):
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            continue
        # Clip to just outside the image: edges beyond it stay invisible, and PIL fails on huge coordinates.
        x1, x2 = (min(max(v, -margin), out.width + margin) for v in sorted((box[0], box[2])))
        y1, y2 = (min(max(v, -margin), out.height + margin) for v in sorted((box[1], box[3])))
        draw.rectangle((x1, y1, x2, y2), outline=rgb, width=width)
        caption = labels[i] if labels is not None else None
        if caption:
            left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
            pad = width
            tab_h = bottom - top + 2 * pad
            tab_x = max(x1, 0)
            if caption_at == "top":  # outside the box when there is room
                tab_y = y1 - tab_h if y1 - tab_h >= 0 else max(y1, 0)
            else:
                tab_y = y2 if y2 + tab_h <= out.height else min(y2, out.height) - tab_h
            tab = (tab_x, tab_y, tab_x + right - left + 2 * pad, tab_y + tab_h)
            draw.rectangle(tab, fill=rgb)
            draw.text((tab_x + pad - left, tab_y + pad - top), caption, fill=_text_color(rgb), font=font)
    return out


LABEL_COLOR, PREDICT_COLOR, HEAD_COLOR = (0, 200, 0), (230, 0, 0), (0, 90, 255)


def draw_prediction(
    image: Image.Image,
    label_boxes: Sequence[Sequence[float]],
    label_refs: Sequence[str | None],
    predict_boxes: Sequence[Sequence[float]],
    predict_refs: Sequence[str | None],
    head_boxes: Sequence[Sequence[float]] | None = None,
) -> Image.Image:
    """One prediction row drawn on ``image``: label boxes green (captions on top), predicted red (captions below),
    bbox-head boxes blue. All boxes ``(x1, y1, x2, y2)`` in pixels of ``image``; ``image`` is not modified."""
    out = draw_boxes(image, label_boxes, LABEL_COLOR, label_refs)
    out = draw_boxes(out, predict_boxes, PREDICT_COLOR, predict_refs, "bottom")
    if head_boxes:
        out = draw_boxes(out, head_boxes, HEAD_COLOR)
    return out
