"""Synthetic instruction-editing pairs with exact targets (``edit`` format), for tests and the demo.

Each row is one coloured shape on a plain background and one edit whose result is rendered exactly:

- recolour: "make the circle blue" -> the same shape, same place, new colour;
- move: "move the square left" -> the same shape shifted by a quarter of the image.

Writes ``DIR/images/*.png``, ``edit_train.jsonl`` / ``edit_val.jsonl`` (rows ``{"source", "instruction", "target",
"expressive", "target_caption"}``, paths relative to ``DIR``) and registers ``synth_edit_train`` / ``synth_edit_val``
in ``DIR/dataset_info.json`` (use ``dataset_dir: DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llamafactory_vision.synth.common import add_common_arguments, check_size, write_split
from llamafactory_vision.synth.grounding import COLOURS, shape_mask

EDIT_SHAPES = ("circle", "square")
EDIT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
DIRECTIONS = {"left": -1, "right": 1}
IMAGE_SIDE = 64
TRAIN_FILE = "edit_train.jsonl"
VAL_FILE = "edit_val.jsonl"
TRAIN_DATASET = "synth_edit_train"
VAL_DATASET = "synth_edit_val"


def edit_dataset_entry(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry for an ``edit`` jsonl file (default column names)."""
    return {"file_name": file_name, "formatting": "edit"}


def _render(shape: str, colour: str, x: int, y: int, side: int, background: tuple[int, int, int]) -> Image.Image:
    pixels = np.empty((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    pixels[:] = background
    pixels[y : y + side, x : x + side][shape_mask(shape, side)] = COLOURS[colour]
    return Image.fromarray(pixels)


def make_edit_pair(rng: np.random.Generator) -> tuple[Image.Image, Image.Image, dict[str, str]]:
    """One (source, target, texts) triple; texts has ``instruction``, ``expressive``, ``target_caption``."""
    shape = str(rng.choice(EDIT_SHAPES))
    colour = str(rng.choice(EDIT_COLOURS))
    side = IMAGE_SIDE * 3 // 8
    step = IMAGE_SIDE // 4
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    y = int(rng.integers(0, IMAGE_SIDE - side + 1))
    if rng.random() < 0.5:  # recolour
        new = str(rng.choice([c for c in EDIT_COLOURS if c != colour]))
        x = int(rng.integers(0, IMAGE_SIDE - side + 1))
        source = _render(shape, colour, x, y, side, background)
        target = _render(shape, new, x, y, side, background)
        texts = {
            "instruction": f"make the {shape} {new}",
            "expressive": f"the {colour} {shape} turns {new} and the background stays the same",
            "target_caption": f"a {new} {shape}",
        }
    else:  # move
        direction = str(rng.choice(tuple(DIRECTIONS)))
        sign = DIRECTIONS[direction]
        lo, hi = (step, IMAGE_SIDE - side) if sign < 0 else (0, IMAGE_SIDE - side - step)
        x = int(rng.integers(lo, hi + 1))
        source = _render(shape, colour, x, y, side, background)
        target = _render(shape, colour, x + sign * step, y, side, background)
        texts = {
            "instruction": f"move the {shape} {direction}",
            "expressive": f"the {colour} {shape} moves to the {direction} and the background stays the same",
            "target_caption": f"a {colour} {shape} on the {direction}",
        }
    return source, target, texts


def generate_edit(out_dir: str | Path, n: int, seed: int = 0, val_frac: float = 0.2) -> dict[str, Any]:
    """Write ``n`` edit pairs (same seed, same bytes) and register them; returns a summary (files, datasets,
    counts per instruction kind)."""
    check_size(n, val_frac)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        source, target, texts = make_edit_pair(rng)
        source.save(out / "images" / f"edit_{i:05d}_0.png")
        target.save(out / "images" / f"edit_{i:05d}_1.png")
        rows.append({"source": f"images/edit_{i:05d}_0.png", "target": f"images/edit_{i:05d}_1.png", **texts})
    n_val = round(n * val_frac) if n > 1 else 0
    files, datasets = (TRAIN_FILE, VAL_FILE), (TRAIN_DATASET, VAL_DATASET)
    summary = write_split(out, rows[: n - n_val], rows[n - n_val :], files, datasets, edit_dataset_entry)
    kinds = {"recolour": sum(r["instruction"].startswith("make") for r in rows)}
    kinds["move"] = n - kinds["recolour"]
    return {**summary, "kinds": kinds}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``edit`` sub-command of ``python -m llamafactory_vision.synth``."""
    parser = commands.add_parser("edit", help="shape recolour/move edits -> edit jsonl + dataset_info")
    add_common_arguments(parser, "pairs")
    parser.set_defaults(generate=lambda args: generate_edit(args.out, args.n, args.seed, args.val_frac))
