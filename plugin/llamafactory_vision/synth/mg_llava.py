"""Synthetic MG-LLaVA data (``mg_llava`` format): shape scenes as ShareGPT conversations with detector-style boxes.

Each row asks what the image shows; the answer names the shapes; ``objects`` carries their exact pixel boxes
(``ref`` = colour and shape), as a detector would give them. A share of rows has no ``objects`` (zero object tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from llamafactory_vision.synth.common import add_common_arguments, check_size, val_indices, write_split
from llamafactory_vision.synth.grounding import PRESETS, make_scene

TRAIN_FILE = "mg_train.jsonl"
VAL_FILE = "mg_val.jsonl"
TRAIN_DATASET = "synth_mg_train"
VAL_DATASET = "synth_mg_val"
NO_OBJECTS_SHARE = 0.25


def make_row(rng: np.random.Generator, out: Path, index: int) -> dict[str, Any]:
    scene = make_scene(rng, PRESETS["varied"], "demo")
    image_path = f"images/{index:06d}.png"
    scene.image.save(out / image_path)
    names = [f"{o.colour} {o.shape}" for o in scene.objects]
    row: dict[str, Any] = {
        "conversations": [
            {"from": "human", "value": "<image>What shapes are in the image?"},
            {"from": "gpt", "value": ", ".join(names) + "."},
        ],
        "images": [image_path],
    }
    if rng.random() >= NO_OBJECTS_SHARE:
        row["objects"] = [{"ref": name, "bbox": list(o.box)} for name, o in zip(names, scene.objects)]
    return row


def dataset_entry(file_name: str) -> dict[str, Any]:
    columns = {"messages": "conversations", "images": "images"}
    return {"file_name": file_name, "formatting": "mg_llava", "columns": columns}


def generate_mg_llava(out_dir: str | Path, n: int, seed: int = 0, val_frac: float = 0.2) -> dict[str, Any]:
    """Write a synthetic ``mg_llava`` dataset (same seed, same bytes); returns a summary like the other generators."""
    check_size(n, val_frac)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    validation = val_indices(n, val_frac, seed)
    train_rows, val_rows = [], []
    for index in range(n):
        row = make_row(np.random.default_rng([seed, index]), out, index)
        (val_rows if index in validation else train_rows).append(row)
    files, datasets = (TRAIN_FILE, VAL_FILE), (TRAIN_DATASET, VAL_DATASET)
    rows = train_rows + val_rows
    return {
        **write_split(out, train_rows, val_rows, files, datasets, dataset_entry),
        "n_objects": sum(len(r.get("objects", [])) for r in rows),
        "rows_without_objects": sum("objects" not in r for r in rows),
    }


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``mg_llava`` sub-command of ``python -m llamafactory_vision.synth``."""
    parser = commands.add_parser("mg_llava", help="shape scenes as conversations + object boxes -> mg_llava jsonl")
    add_common_arguments(parser, "rows")
    parser.set_defaults(generate=lambda args: generate_mg_llava(args.out, args.n, args.seed, args.val_frac))
