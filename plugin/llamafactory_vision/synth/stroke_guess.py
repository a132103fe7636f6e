"""Synthetic Draw&Guess data (``stroke_guess`` format): simple objects sketched as strokes over shapes.

``guess`` rows: a background (bright paper or a muted pattern) with a few filled shapes, and an object sketched as
polylines (circle, triangle, square, star, house, arrow, zigzag) whose name is the answer. Bright paper makes the
renderer paint the sketch black, muted backgrounds white, so both branches occur. ``contour`` rows: a filled shape
whose mask is written as ``stroke_mask``; the answer is the shape's colour and name.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llamafactory_vision.synth.common import add_common_arguments, check_size, val_indices, write_split
from llamafactory_vision.synth.grounding import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    draw_background,
    shape_mask,
)

TRAIN_FILE = "strokes_train.jsonl"
VAL_FILE = "strokes_val.jsonl"
TRAIN_DATASET = "synth_strokes_train"
VAL_DATASET = "synth_strokes_val"
TASK_WEIGHTS = {"guess": 0.7, "contour": 0.3}


def _regular(n: int, phase: float = -math.pi / 2, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n + 1)]  # fmt: skip


def _star() -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + math.pi * k / 5),
             (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(11)]  # fmt: skip


# Sketches as strokes in a unit frame [-1, 1]^2 (y down): each a list of polylines.
SKETCHES: dict[str, list[list[tuple[float, float]]]] = {
    "circle": [_regular(16)],
    "triangle": [_regular(3)],
    "square": [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8), (-0.8, -0.8)]],
    "star": [_star()],
    "house": [[(-0.7, 0.0), (-0.7, 0.9), (0.7, 0.9), (0.7, 0.0)], [(-0.9, 0.1), (0.0, -0.9), (0.9, 0.1)]],
    "arrow": [[(-0.9, 0.0), (0.9, 0.0)], [(0.4, -0.5), (0.9, 0.0), (0.4, 0.5)]],
    "zigzag": [[(-0.9, 0.5), (-0.45, -0.5), (0.0, 0.5), (0.45, -0.5), (0.9, 0.5)]],
}


def sketch_strokes(name: str, centre: tuple[float, float], radius: float) -> list[list[list[float]]]:
    """The strokes of sketch ``name`` scaled by ``radius`` around ``centre`` (pixels), rounded to 0.1 px."""
    cx, cy = centre
    return [[[round(cx + radius * x, 1), round(cy + radius * y, 1)] for x, y in line] for line in SKETCHES[name]]


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    if rng.random() < 0.5:  # paper, as on MagicQuill's canvas: mean brightness > 0.8, the sketch is painted black
        return np.full((height, width, 3), int(rng.integers(220, 251)), np.uint8), "paper"
    kind = str(rng.choice([b for b in BACKGROUNDS if b != "ramp"]))
    return draw_background(rng, kind, width, height), kind


def _paste_shape(image: np.ndarray, rng: np.random.Generator, shape: str, colour: str, side: int) -> np.ndarray:
    """Fill ``shape`` at a random place; returns its mask ``(H, W)`` bool."""
    height, width = image.shape[:2]
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    mask = np.zeros((height, width), bool)
    mask[y0:y0 + side, x0:x0 + side] = shape_mask(shape, side)
    image[mask] = COLOURS[colour]
    return mask


def make_row(rng: np.random.Generator, out: Path, index: int, task: str) -> dict[str, Any]:
    """Draw one scene, write its image (and mask for ``contour``) under ``out/images`` and return its row."""
    width, height = int(rng.integers(64, 129)), int(rng.integers(64, 129))
    image, _ = _background(rng, width, height)
    image = image.copy()
    short = min(width, height)
    for _ in range(int(rng.integers(0, 3))):  # distractor shapes under the sketch
        _paste_shape(image, rng, str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), int(short * 0.3))
    image_path = f"images/{index:06d}.png"
    row: dict[str, Any] = {"image": image_path, "task": task}
    if task == "guess":
        name = str(rng.choice(list(SKETCHES)))
        radius = float(rng.uniform(0.2, 0.4)) * short
        cx = float(rng.uniform(radius + 2, width - 1 - radius - 2))
        cy = float(rng.uniform(radius + 2, height - 1 - radius - 2))
        row.update(strokes=sketch_strokes(name, (cx, cy), radius), stroke_width=max(2, round(short / 32)),
                   answer=name)  # fmt: skip
    else:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        mask = _paste_shape(image, rng, shape, colour, int(short * float(rng.uniform(0.4, 0.7))))
        mask_path = f"images/{index:06d}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_path)
        row.update(stroke_mask=mask_path, stroke_width=max(2, round(short / 40)), answer=f"{colour} {shape}")
    Image.fromarray(image).save(out / image_path)
    return row


def dataset_entry(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry for a ``stroke_guess`` jsonl file."""
    return {"file_name": file_name, "formatting": "stroke_guess"}


def generate_stroke_guess(out_dir: str | Path, n: int, seed: int = 0, val_frac: float = 0.2) -> dict[str, Any]:
    """Write a synthetic ``stroke_guess`` dataset (same seed, same bytes).

    Returns:
        dict: ``out_dir``, ``train_file``, ``val_file`` (None when empty), ``dataset_info``, ``datasets``,
        ``n_train``, ``n_val`` and counts per ``tasks`` and ``answers``.
    """
    check_size(n, val_frac)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    validation = val_indices(n, val_frac, seed)
    tasks, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    train_rows, val_rows, task_counts, answers = [], [], Counter(), Counter()
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        task = tasks[int(rng.choice(len(tasks), p=weights))]
        row = make_row(rng, out, index, task)
        (val_rows if index in validation else train_rows).append(row)
        task_counts[task] += 1
        answers[row["answer"]] += 1
    files, datasets = (TRAIN_FILE, VAL_FILE), (TRAIN_DATASET, VAL_DATASET)
    return {
        **write_split(out, train_rows, val_rows, files, datasets, dataset_entry),
        "tasks": dict(task_counts),
        "answers": dict(answers),
    }


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``stroke_guess`` sub-command of ``python -m llamafactory_vision.synth``."""
    parser = commands.add_parser("stroke_guess", help="sketches over shapes -> stroke_guess jsonl + dataset_info")
    add_common_arguments(parser, "rows")
    parser.set_defaults(generate=lambda args: generate_stroke_guess(args.out, args.n, args.seed, args.val_frac))
