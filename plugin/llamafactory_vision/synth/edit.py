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
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llamafactory_vision.synth.grounding import COLOURS, merge_dataset_info, shape_mask

EDIT_SHAPES = ("circle", "square")
EDIT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
DIRECTIONS = {"left": -1, "right": 1}
IMAGE_SIDE = 64
TRAIN_FILE = "edit_train.jsonl"
VAL_FILE = "edit_val.jsonl"


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
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
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
    splits = {TRAIN_FILE: rows[: n - n_val], VAL_FILE: rows[n - n_val :]}
    entries = {}
    for file_name, split_rows in splits.items():
        if split_rows:
            (out / file_name).write_text("".join(json.dumps(r) + "\n" for r in split_rows))
            entries[f"synth_edit_{file_name.split('_')[1].split('.')[0]}"] = edit_dataset_entry(file_name)
    merge_dataset_info(out / "dataset_info.json", entries)
    kinds = {"recolour": sum(r["instruction"].startswith("make") for r in rows)}
    kinds["move"] = n - kinds["recolour"]
    return {
        "out_dir": str(out),
        "train_file": str(out / TRAIN_FILE),
        "val_file": str(out / VAL_FILE) if n_val else None,
        "dataset_info": str(out / "dataset_info.json"),
        "datasets": list(entries),
        "n_train": n - n_val,
        "n_val": n_val,
        "kinds": kinds,
    }


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``edit`` sub-command of ``python -m llamafactory_vision.synth``."""
    parser = commands.add_parser("edit", help="shape recolour/move edits -> edit jsonl + dataset_info")
    parser.add_argument("--out", required=True, help="output folder (use it as dataset_dir)")
    parser.add_argument("--n", type=int, required=True, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-frac", type=float, default=0.2, help="fraction of pairs for validation")
    parser.set_defaults(generate=lambda args: generate_edit(args.out, args.n, args.seed, args.val_frac))
