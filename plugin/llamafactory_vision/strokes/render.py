"""Pure rendering for MagicQuill's Draw&Guess: stroke masks, the two stroke tasks, the bbox in the prompt, padding.

Coordinates: pixels of the original image, ``x`` to the right and ``y`` down, the centre of pixel ``(i, j)`` at
``(i, j)`` (PIL's convention). A mask is ``np.ndarray[bool]`` of shape ``(H, W)``. Boxes are ``xyxy`` in pixel
*edges* (a mask covering columns 3..5 has ``x1 = 3, x2 = 6``), as everywhere else in this package, so dividing by
``W``/``H`` gives ``[0, 1]``.

MagicQuill (magic-quill/MagicQuill, ``llava_new.py``) paints the stroked pixels black when their mean brightness,
over pixels and channels in ``[0, 1]``, is above 0.8 and white otherwise, so the sketch always contrasts with what
is under it; a colour edit is shown by drawing its region's outer contour in red. Both are reproduced here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from llamafactory_vision.synth.grounding import tight_box

TASKS = ("guess", "contour")
BRIGHTNESS_THRESHOLD = 0.8
CONTOUR_RGB = (255, 0, 0)


def default_stroke_width(size: tuple[int, int]) -> int:
    """A brush about 1% of the longer side, at least 3 px: visible after LLaVA's downscale to 336 px."""
    return max(3, round(0.01 * max(size)))


def strokes_mask(strokes: Sequence[Sequence[Sequence[float]]], size: tuple[int, int], width: int) -> np.ndarray:
    """Rasterise polylines drawn with a round brush of ``width`` pixels.

    Args:
        strokes: one list of ``[x, y]`` points (pixels of the original image) per stroke; a one-point stroke is a dot.
        size (tuple[int, int]): ``(W, H)`` of the image.
        width (int): brush diameter in pixels, >= 1.

    Returns:
        np.ndarray[bool] of shape ``(H, W)``: True where the brush passed.
    """
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    radius = (width - 1) / 2
    for stroke in strokes:
        points = [(float(x), float(y)) for x, y in stroke]
        if len(points) > 1:
            draw.line(points, fill=255, width=width, joint="curve")
        for x, y in points:  # round caps and joints; PIL's line has square ends
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(canvas) > 0


def stroke_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``xyxy`` box in pixel edges of the True pixels of ``mask`` ``(H, W)``; ValueError if empty."""
    return tight_box(mask)


def normalized_corners(box_xyxy: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x1 / W, y1 / H, x2 / W, y2 / H)``: the corners as MagicQuill's prompt gives them (no padding applied)."""
    width, height = size
    x1, y1, x2, y2 = box_xyxy
    return x1 / width, y1 / height, x2 / width, y2 / height


def mean_brightness(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the masked pixels and their 3 channels of ``image`` ``(H, W, 3)`` uint8, scaled to ``[0, 1]``."""
    return float(image[mask].astype(np.float64).mean() / 255.0)


def paint_guess(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ``guess`` task: stroked pixels black where their mean brightness is > 0.8, else white.

    Args:
        image: ``np.ndarray[uint8]`` of shape ``(H, W, 3)``; not modified.
        mask: ``np.ndarray[bool]`` of shape ``(H, W)``, non-empty.

    Returns:
        A new ``(H, W, 3)`` uint8 array.
    """
    out = image.copy()
    out[mask] = 0 if mean_brightness(image, mask) > BRIGHTNESS_THRESHOLD else 255
    return out


def contour_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width / 2`` (Chebyshev) of the region's boundary: OpenCV's ``drawContours(thickness=width)``
    of the outer contour, without OpenCV. Holes in the region are filled first (outer contour only).

    Returns:
        np.ndarray[bool] of shape ``(H, W)``.
    """
    region = ndimage.binary_fill_holes(mask)
    boundary = region & ~ndimage.binary_erosion(region, border_value=0)
    reach = max(width // 2, 0)
    if reach == 0:
        return boundary
    return ndimage.binary_dilation(boundary, structure=np.ones((3, 3), bool), iterations=reach)


def paint_contour(image: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """The ``contour`` task: the region's outer contour drawn in red, ``width`` pixels thick (``(H, W, 3)`` uint8)."""
    out = image.copy()
    out[contour_band(mask, width)] = CONTOUR_RGB
    return out


def render(image: np.ndarray, mask: np.ndarray, task: str, width: int) -> np.ndarray:
    """Apply ``task`` (``guess`` or ``contour``) to ``image`` ``(H, W, 3)`` uint8 for the region ``mask``."""
    if task == "guess":
        return paint_guess(image, mask)
    if task == "contour":
        return paint_contour(image, mask, width)
    raise ValueError(f"task={task!r}: expected one of {TASKS}")


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad the shorter side equally on both sides (the extra pixel, if odd, after) to a
    square of side ``max(W, H)`` filled with ``fill``; the original sits at ``((S - W) // 2, (S - H) // 2)``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), fill)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def mean_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The pad colour LLaVA-1.5 trains with: ``tuple(int(m * 255) for m in processor.image_mean)``.

    (MagicQuill's inference code passes ``int(m)`` of the [0, 1] mean, i.e. black; we follow LLaVA's training.)
    """
    return tuple(int(m * 255) for m in image_mean)
