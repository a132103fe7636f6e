"""Row-indexed conversion of our dataset formats, with counted skips of invalid rows.

Shared by the ``grounding`` and ``edit`` formats; kept apart from both so that either can be imported first (the
host's import hooks may import one while the other is still executing).
"""

from __future__ import annotations

from collections import Counter

from llamafactory.extras import logging

logger = logging.get_logger(__name__)

SKIP_COLUMN = "_lfv_skip"  # the converter's reason for dropping a row ("" = keep)


def align_with_row_checks(dataset, dataset_attr, data_args, training_args, formatting: str, invalid_key: str):
    """``align_dataset`` for one of our formats: converts with row indices (for error messages), then drops the rows
    the converter marked invalid in ``SKIP_COLUMN`` (when ``data_args.<invalid_key>`` is ``skip``) and reports how
    many were skipped for each reason."""
    from llamafactory.data.converter import get_dataset_converter

    skip = getattr(data_args, invalid_key) == "skip"
    if skip and data_args.streaming:
        raise ValueError(f"`{invalid_key}: skip` needs `streaming: false`, so that skipped rows can be counted.")
    column_names = list(next(iter(dataset)).keys())
    kwargs = {}
    if not data_args.streaming:
        kwargs = {
            "num_proc": data_args.preprocessing_num_workers,
            "load_from_cache_file": (not data_args.overwrite_cache) or (training_args.local_process_index != 0),
            "desc": f"Converting {formatting} dataset",
        }
    converter = get_dataset_converter(formatting, dataset_attr, data_args)
    dataset = dataset.map(converter, with_indices=True, batched=False, remove_columns=column_names, **kwargs)
    if skip:
        skipped = Counter(reason for reason in dataset[SKIP_COLUMN] if reason)
        if skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
            logger.warning_rank0(
                f"{formatting} dataset {dataset_attr.dataset_name!r}: skipped {sum(skipped.values())} of "
                f"{len(dataset)} rows ({counts})."
            )
            dataset = dataset.filter(lambda reason: not reason, input_columns=SKIP_COLUMN)
    return dataset.remove_columns(SKIP_COLUMN)
