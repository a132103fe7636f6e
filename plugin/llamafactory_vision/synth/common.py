"""What every synth generator shares: argument checks, the train/val split, the jsonl files with their
``dataset_info.json`` entries, the returned summary and the ``--out/--n/--seed/--val-frac`` arguments."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def check_size(n: int, val_frac: float) -> None:
    """Refuse a row count below 1 or a validation fraction outside ``[0, 1)``, naming the argument."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")


def val_count(n: int, val_frac: float) -> int:
    """Validation rows out of ``n``: ``round(n * val_frac)``, but at least one validation and one training row
    whenever a split is asked for (``val_frac > 0``) and possible (``n >= 2``)."""
    if val_frac == 0 or n < 2:
        return 0
    return min(max(1, round(n * val_frac)), n - 1)


def val_indices(n: int, val_frac: float, seed: int) -> set[int]:
    """The row indices of the validation split: the first :func:`val_count` of a permutation drawn from ``seed``,
    so the split does not depend on how rows are generated."""
    return set(np.random.default_rng(seed).permutation(n)[: val_count(n, val_frac)].tolist())


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8 (non-ASCII text kept as is)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def merge_dataset_info(path: str | Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Add or replace ``entries`` in the ``dataset_info.json`` at ``path``, keeping every other entry.

    Returns:
        dict: the merged content, also written to ``path``.
    """
    path = Path(path)
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); fix or remove it before merging") from err
        if not isinstance(info, dict):
            raise ValueError(f"{path}: expected a JSON object of dataset entries, got {type(info).__name__}")
    info.update(entries)
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def write_split(
    out: Path,
    train_rows: Sequence[dict[str, Any]],
    val_rows: Sequence[dict[str, Any]],
    files: tuple[str, str],
    datasets: tuple[str, str],
    entry: Callable[[str], dict[str, Any]],
) -> dict[str, Any]:
    """Write each non-empty split as jsonl under ``out`` and register it in ``out/dataset_info.json``.

    Args:
        out (Path): the dataset folder (``dataset_dir``).
        train_rows, val_rows (Sequence[dict]): the rows of each split; an empty split is neither written nor
            registered.
        files (tuple[str, str]): ``(train, val)`` jsonl file names, relative to ``out``.
        datasets (tuple[str, str]): ``(train, val)`` dataset names in ``dataset_info.json``.
        entry (Callable[[str], dict]): the ``dataset_info.json`` entry for a file name.

    Returns:
        dict: the summary every generator starts from: ``out_dir``, ``train_file``, ``val_file`` (None when the
        validation split is empty), ``dataset_info``, ``datasets`` (names registered), ``n_train``, ``n_val``.
    """
    entries = {}
    for rows, file_name, dataset in zip((train_rows, val_rows), files, datasets):
        if rows:
            write_jsonl(out / file_name, rows)
            entries[dataset] = entry(file_name)
    merge_dataset_info(out / "dataset_info.json", entries)
    return {
        "out_dir": str(out),
        "train_file": str(out / files[0]),
        "val_file": str(out / files[1]) if val_rows else None,
        "dataset_info": str(out / "dataset_info.json"),
        "datasets": list(entries),
        "n_train": len(train_rows),
        "n_val": len(val_rows),
    }


def add_common_arguments(parser: argparse.ArgumentParser, rows: str) -> None:
    """``--out``, ``--n``, ``--seed`` and ``--val-frac``, the arguments of every generator's sub-command;
    ``rows`` names what ``--n`` counts in the help (``"scenes"``, ``"pairs"``, ...)."""
    parser.add_argument("--out", required=True, help="output folder (use it as dataset_dir)")
    parser.add_argument("--n", type=int, required=True, help=f"number of {rows}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-frac", type=float, default=0.2, help=f"fraction of {rows} for validation")
