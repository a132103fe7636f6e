"""Row-indexed conversion of our dataset formats, with counted skips of invalid rows.

Shared by the ``grounding`` and ``edit`` formats; kept apart from both so that either can be imported first (the
host's import hooks may import one while the other is still executing).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from llamafactory_vision.log import get_logger

logger = get_logger(__name__)

SKIP_COLUMN = "_lfv_skip"  # the converter's reason for dropping a row ("" = keep)


class RowError(ValueError):
    """An invalid row of one of our dataset formats; ``reason`` is a short key used to count skipped rows.

    The message names the format (``kind``), dataset, row (counting from 0: the first row of the file is row 0, an
    editor would call it line 1) and field. Subclasses set ``kind``.
    """

    kind = "dataset"

    def __init__(self, dataset: str, row: int | None, field: str, message: str, reason: str, kind: str | None = None):
        self.kind = kind or type(self).kind
        row_text = f"row {row if row is not None else '?'} (counting from 0)"
        where = f"{self.kind} dataset {dataset!r}, {row_text}, field `{field}`"
        super().__init__(f"{where}: {message}")
        self.dataset, self.row, self.field, self.message, self.reason = dataset, row, field, message, reason

    def __reduce__(self):
        # Pickle rebuilds an exception as `cls(*self.args)`, and `args` holds only the formatted text: without this,
        # a worker of `preprocessing_num_workers > 1` sends an error the parent cannot rebuild and the pool hangs.
        return type(self), (self.dataset, self.row, self.field, self.message, self.reason, self.kind)


_ROWS_SHOWN = 50  # skipped row numbers in the log line; the file beside the outputs lists them all


def _write_skipped_rows(
    formatting: str, dataset_name: str, rows: list[int], reasons: list[str], training_args
) -> str | None:
    """Write ``<output_dir>/<formatting>_skipped_rows/<dataset>.json`` (the skipped row numbers, counting from 0, and
    their reasons) from the first process of each node; returns its path, or None where no output_dir is set."""
    output_dir = getattr(training_args, "output_dir", None)
    if not output_dir:
        return None
    safe_name = re.sub(r"[^\w.-]+", "_", dataset_name)
    path = os.path.join(output_dir, f"{formatting}_skipped_rows", f"{safe_name}.json")
    if training_args.local_process_index == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        report = {
            "dataset": dataset_name,
            "rows_count_from": 0,
            "total_rows": len(reasons),
            "skipped": [{"row": i, "reason": reasons[i]} for i in rows],
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return path


class BatchedConverter:
    """A row converter ``converter(row, index) -> dict`` as a batched ``datasets.map`` function: the same rows out,
    in order, with the same columns and types (tests/test_grounding_data.py compares both maps), without
    ``datasets``' per-row formatting and writing (~0.12 ms a row of ~0.45)."""

    def __init__(self, converter) -> None:
        self.converter = converter

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        names = list(batch)
        rows = [self.converter({name: batch[name][j] for name in names}, index) for j, index in enumerate(indices)]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def align_with_row_checks(dataset, dataset_attr, data_args, training_args, formatting: str, invalid_key: str):
    """``align_dataset`` for one of our formats: converts with row indices (for error messages), then drops the rows
    the converter marked invalid in ``SKIP_COLUMN`` (when ``data_args.<invalid_key>`` is ``skip``), reports how many
    were skipped for each reason and which rows (counting from 0), and lists them in
    ``<output_dir>/<formatting>_skipped_rows/<dataset>.json``."""
    from llamafactory.data.converter import get_dataset_converter

    skip = getattr(data_args, invalid_key) == "skip"
    if skip and data_args.streaming:
        raise ValueError(f"`{invalid_key}: skip` needs `streaming: false`, so that skipped rows can be counted.")
    first = next(iter(dataset), None)
    if first is None:
        hint = ""
        if data_args.streaming:  # the host's to_iterable_dataset(num_shards=dataloader_num_workers): 0 shards, 0 rows
            hint = (
                " (with `streaming: true` LLaMA-Factory splits a local file into `dataloader_num_workers` shards: "
                "set it to 1 or more)"
            )
        raise ValueError(f"{formatting} dataset {dataset_attr.dataset_name!r} has no rows{hint}.")
    column_names = list(first.keys())
    kwargs = {}
    if not data_args.streaming:
        kwargs = {
            "num_proc": data_args.preprocessing_num_workers,
            "load_from_cache_file": (not data_args.overwrite_cache) or (training_args.local_process_index != 0),
            "desc": f"Converting {formatting} dataset",
        }
    converter = BatchedConverter(get_dataset_converter(formatting, dataset_attr, data_args))
    dataset = dataset.map(converter, with_indices=True, batched=True, remove_columns=column_names, **kwargs)
    if skip:
        reasons = dataset[SKIP_COLUMN]
        skipped = Counter(reason for reason in reasons if reason)
        if skipped:
            rows = [i for i, reason in enumerate(reasons) if reason]  # map keeps the file's order: i is the row
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
            path = _write_skipped_rows(formatting, dataset_attr.dataset_name, rows, reasons, training_args)
            shown = ", ".join(map(str, rows[:_ROWS_SHOWN])) + (", ..." if len(rows) > _ROWS_SHOWN else "")
            logger.warning_rank0(
                f"{formatting} dataset {dataset_attr.dataset_name!r}: skipped {sum(skipped.values())} of "
                f"{len(dataset)} rows ({counts}): rows {shown} (rows count from 0: the first row of the file is "
                f"row 0){f'; every skipped row and its reason: {path}' if path else ''}."
            )
            dataset = dataset.filter(lambda reason: not reason, input_columns=SKIP_COLUMN)
    return dataset.remove_columns(SKIP_COLUMN)
