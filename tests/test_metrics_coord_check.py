"""The vectorised coordinate-space check of grounding/metrics.py against the per-row Python check it replaced (kept
here as the oracle, as it was written), on generated runs: scaled, in range, out of range, borderline, non-finite."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from llamafactory_vision.grounding.formats import RELATIVE_SCALE, Box
from llamafactory_vision.grounding.metrics import (
    FAMILY_BOUNDS,
    MIN_CHECKED,
    SCALE_FACTOR,
    CoordinateCheck,
    RowScore,
    check_coordinate_space,
)


def _box_ratios(pred: Sequence[Box], label: Sequence[Box]) -> tuple[float, float, float, float] | None:
    """Per-axis ratios ``(cx, w, cy, h)`` of the predicted box extent to the label box extent, or None when a centre
    or a size is not positive (a ratio would mean nothing)."""

    def extent(boxes: Sequence[Box]) -> tuple[float, float, float, float]:
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        return (x1 + x2) / 2, x2 - x1, (y1 + y2) / 2, y2 - y1

    p, t = extent(pred), extent(label)
    if not all(math.isfinite(v) and v > 0 for v in (*p, *t)):
        return None
    return tuple(a / b for a, b in zip(p, t))


def reference_check(
    rows: Sequence[RowScore], family: str | None = None, bounds: tuple[float, float] | None = None
) -> CoordinateCheck:
    """``check_coordinate_space`` as it was before vectorising (see its docstring for what it checks)."""
    if bounds is None and family is not None:
        bounds = FAMILY_BOUNDS.get(family)
    box_rows = [r for r in rows if r.kind in ("rec", "detect") and r.pred_boxes]
    preds = [b for r in box_rows for b in r.pred_boxes]
    metrics: dict[str, float | int] = {}
    warnings = []
    if bounds is not None:
        bx, by = bounds
        outside = sum(min(b) < 0 or b[0] > bx or b[2] > bx or b[1] > by or b[3] > by for b in preds)
        metrics["pred_out_of_range"] = outside / max(len(preds), 1)
        if len(preds) >= MIN_CHECKED and outside > len(preds) / 2:
            warnings.append(
                f"{outside} of {len(preds)} predicted boxes fall outside the coordinate range 0-{bx:g} x 0-{by:g}"
                f"{f' of {family}' if family else ''}: the model seems to write another coordinate space."
            )
        unit = sum(0 <= min(b) and max(b) <= 1 for b in preds)
        if min(bx, by) > 1 and len(preds) >= MIN_CHECKED and unit > len(preds) / 2:
            warnings.append(
                f"{unit} of {len(preds)} predicted boxes lie within [0, 1]: they look like normalised coordinates, "
                f"but the labels use 0-{bx:g}."
            )
    ratios = [r for r in (_box_ratios(row.pred_boxes, row.label_boxes) for row in box_rows) if r is not None]
    log_factor, tolerance = math.log(SCALE_FACTOR), math.log(1.25)

    def scaled(ratio: tuple[float, float, float, float], sign: int) -> bool:
        logs = [math.log(v) for v in ratio]
        same_box = abs(logs[0] - logs[1]) < tolerance and abs(logs[2] - logs[3]) < tolerance
        return same_box and all(sign * v >= log_factor for v in logs)

    for sign, direction in ((1, "up"), (-1, "down")):
        hits = [r for r in ratios if scaled(r, sign)]
        if len(ratios) >= MIN_CHECKED and len(hits) > len(ratios) / 2:
            sx = sorted(r[0] for r in hits)[len(hits) // 2]
            sy = sorted(r[2] for r in hits)[len(hits) // 2]
            message = (
                f"in {len(hits)} of {len(ratios)} rows the predicted box is the label box scaled {direction} "
                f"(median x{sx:.2f} in x, x{sy:.2f} in y): the predictions use another coordinate space than the labels"
            )
            if family == "qwen2_5_vl" and sign > 0 and all(max(b) <= RELATIVE_SCALE for b in preds):
                message += (
                    "; they look like 0-1000 coordinates (Qwen2-VL / Qwen3-VL), but Qwen2.5-VL writes pixels of the "
                    "image as the model sees it"
                )
            warnings.append(message + ".")
    metrics["coord_space_suspect"] = int(bool(warnings))
    return CoordinateCheck(metrics=metrics, warning=" ".join(warnings) or None)


def _box(rng: random.Random, scale: float) -> Box:
    x1, y1 = rng.uniform(-0.05, 0.9) * scale, rng.uniform(-0.05, 0.9) * scale
    return (x1, y1, x1 + rng.uniform(0, 0.5) * scale, y1 + rng.uniform(0, 0.5) * scale)


def _scaled(box: Box, sx: float, sy: float) -> Box:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


ODD = (math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1.0, 1000.0, 1001.0)


def _run(rng: random.Random, rows: int) -> list[RowScore]:
    """Rows of one generated run: a mix of kinds, box counts and ways to be in or out of the labels' space."""
    space = rng.choice((1.0, 1000.0, 700.0))
    # factors at SCALE_FACTOR and just past it either way (within the vectorised check's margin)
    factor = rng.choice((1.0, SCALE_FACTOR, 1 / SCALE_FACTOR, 1.2000001, 0.8333333, 1.1999999, 1000.0, 1 / 1000))
    scaled_share = rng.choice((0.0, 0.6, 1.0))  # of rows written in the other space (or exactly scaled)
    out = []
    for _ in range(rows):
        labels = [_box(rng, space) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        how = rng.choice((0, 4)) if rng.random() < scaled_share else rng.randrange(6)
        if how == 0:  # another space
            preds = [_scaled(b, factor, factor * rng.choice((1, 1.1, 1.3))) for b in labels]
        elif how == 1:  # noisy, same space
            preds = [tuple(v + rng.uniform(-0.05, 0.05) * space for v in b) for b in labels]
        elif how == 2:  # odd numbers anywhere, in any order
            preds = [tuple(rng.choice((v, rng.choice(ODD))) for v in b) for b in labels]
        elif how == 3:
            preds = [_box(rng, space) for _ in range(rng.randrange(0, 4))]
        elif how == 4:  # the label box itself, scaled exactly
            preds = [_scaled(b, factor, factor) for b in labels]
        else:
            preds = [(0, 0, 1, 1), (2, 1, 0, 0)][: rng.randrange(1, 3)]  # ints, an inverted box
        if rng.random() < 0.1:
            labels = [tuple(rng.choice((v, rng.choice(ODD))) for v in b) for b in labels]
        kind = rng.choice(("rec", "detect", "reg", "label_failed")) if rng.random() < 0.2 else "rec"
        out.append(RowScore(kind=kind, pred_boxes=tuple(preds), label_boxes=tuple(labels)))
    return out


@pytest.mark.parametrize("seed", range(2))
def test_vectorised_check_equals_the_per_row_check(seed):
    rng = random.Random(seed)
    warned = 0
    for _ in range(100):
        rows = _run(rng, rng.choice((0, 3, MIN_CHECKED, 12, 60)))
        for family, bounds in (
            (None, None),
            ("qwen2_vl", None),
            ("qwen2_5_vl", None),
            ("llava", None),
            (None, (1, 1)),
        ):
            expected = reference_check(rows, family, bounds)
            assert check_coordinate_space(rows, family, bounds) == expected
            warned += expected.warning is not None
    assert warned > 50  # the runs reach the warnings, not only the quiet case
