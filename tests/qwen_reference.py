"""Qwen's own box converters, re-implemented here from their source as test oracles (never from our codecs).

Source: QwenLM/Qwen3-VL, qwen-vl-finetune/tools/process_bbox.ipynb (also QwenLM/Qwen2.5-VL, same path):
``convert_to_qwen2vl_format(bbox, h, w)`` rounds ``x1 / w * 1000`` and clamps to [0, 1000] (Qwen2-VL and Qwen3-VL);
``convert_to_qwen25vl_format(bbox, orig_height, orig_width, ...)`` takes ``(new_height, new_width)`` from
``smart_resize``, rounds ``x1 * (new_width / orig_width)`` and clamps to ``[0, new_width - 1] x [0, new_height - 1]``.
Here the model-view size is passed in, because LLaMA-Factory resizes once more before the processor's smart_resize.

The notebook evaluates ``x1 * scale_w`` in floats; at an exact ``.5`` tie that product can land a float ulp to either
side (``1554 * (1260 / 2160) = 906.5000000000001``), so :func:`convert_to_qwen25vl_format_exact` evaluates the same
formula in exact rationals, with the same ``round`` (half to even). :func:`convert_to_qwen25vl_format` is the literal
float version.
"""

from __future__ import annotations

from fractions import Fraction


def convert_to_qwen2vl_format(bbox, h, w):
    x1, y1, x2, y2 = bbox
    x1_new = round(x1 / w * 1000)
    y1_new = round(y1 / h * 1000)
    x2_new = round(x2 / w * 1000)
    y2_new = round(y2 / h * 1000)
    return [max(0, min(v, 1000)) for v in (x1_new, y1_new, x2_new, y2_new)]


def convert_to_qwen25vl_format(bbox, orig_height, orig_width, new_height, new_width):
    scale_w = new_width / orig_width
    scale_h = new_height / orig_height
    x1, y1, x2, y2 = bbox
    x1_new = max(0, min(round(x1 * scale_w), new_width - 1))
    y1_new = max(0, min(round(y1 * scale_h), new_height - 1))
    x2_new = max(0, min(round(x2 * scale_w), new_width - 1))
    y2_new = max(0, min(round(y2 * scale_h), new_height - 1))
    return [x1_new, y1_new, x2_new, y2_new]


def convert_to_qwen25vl_format_exact(bbox, orig_height, orig_width, new_height, new_width):
    scale_w = Fraction(new_width, orig_width)
    scale_h = Fraction(new_height, orig_height)
    x1, y1, x2, y2 = (Fraction(v) for v in bbox)
    return [
        max(0, min(round(x1 * scale_w), new_width - 1)),
        max(0, min(round(y1 * scale_h), new_height - 1)),
        max(0, min(round(x2 * scale_w), new_width - 1)),
        max(0, min(round(y2 * scale_h), new_height - 1)),
    ]
