"""``neat_packing`` with the bbox head: the host's packed rows, plus each pack's box columns.

The head reads the hidden state at each box's token position (``bbox_spans``, see head_data.py). The host's
``PackedSupervisedDatasetProcessor`` groups rows into ``cutoff_len`` sequences (greedy knapsack by length) and, with
``neat_packing``, records where each row starts (``packing_params.sequence_boundaries``); its collator then gives each
row a block-diagonal attention mask and its own M-RoPE positions, so a row's hidden states in a pack are those it has
alone (tests/test_packing.py checks the logits). A pack's spans are therefore its rows' spans shifted by each row's
start, and its targets the rows' targets in the same order.

Packing stays the host's: each row is tokenized once, by :class:`GroundingBBoxDatasetProcessor` (the host's
supervised encoding plus the box columns), the host's packing loop takes those token ids instead of encoding again,
and the rows of every pack are matched back to their box columns in the order the host takes them (the last row of
each length first), each match checked token for token.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from llamafactory.data.processor.supervised import PackedSupervisedDatasetProcessor
from llamafactory.extras.constants import IGNORE_INDEX

from llamafactory_vision.grounding.head_data import GroundingBBoxDatasetProcessor


@dataclass
class PackedGroundingBBoxDatasetProcessor(PackedSupervisedDatasetProcessor):
    """The host's ``neat_packing`` processor whose packs carry ``bbox_spans`` (shifted to the pack), ``bbox_targets``
    and ``bbox_cut`` (summed over the pack's rows)."""

    _rows: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    _next_row: int = field(default=0, repr=False)

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        boxes = GroundingBBoxDatasetProcessor(
            template=self.template, tokenizer=self.tokenizer, processor=self.processor, data_args=self.data_args
        )
        self._rows, self._next_row = boxes.preprocess_dataset(examples), 0
        packed = super().preprocess_dataset(examples)
        if self._next_row != len(self._rows.get("input_ids", [])):
            rows = len(self._rows.get("input_ids", []))
            raise RuntimeError(f"packing encoded {self._next_row} rows, the box columns have {rows}")
        by_length: dict[int, list[int]] = defaultdict(list)  # the host's `length2indexes`, in the same order
        for index, ids in enumerate(self._rows.get("input_ids", [])):
            if len(ids) <= self.data_args.cutoff_len:
                by_length[len(ids)].append(index)
        packed["bbox_spans"], packed["bbox_targets"], packed["bbox_cut"] = [], [], []
        for ids, labels, params in zip(packed["input_ids"], packed["labels"], packed["packing_params"], strict=True):
            spans, targets, cut = [], [], 0
            bounds = params["sequence_boundaries"]
            for start, end in itertools.pairwise(bounds):
                candidates = by_length.get(end - start)
                if candidates and self._rows["input_ids"][candidates[-1]] == ids[start:end]:
                    row = candidates.pop()  # the host takes the last row of each length
                    spans += [[open_ + start, close + start] for open_, close in self._rows["bbox_spans"][row]]
                    targets += self._rows["bbox_targets"][row]
                    cut += self._rows["bbox_cut"][row]
                elif end != len(ids) or any(label != IGNORE_INDEX for label in labels[start:end]):
                    raise RuntimeError("a packed row matches no tokenized row: the host's packing order changed")
                # else: the pack's right padding, recorded as a last boundary
            packed["bbox_spans"].append(spans)
            packed["bbox_targets"].append(targets)
            packed["bbox_cut"].append(cut)
        return packed

    def _encode_data_example(self, prompt, response, system, tools, images, videos, audios):
        """The next row as :class:`GroundingBBoxDatasetProcessor` tokenized it (the host calls this once per valid
        row, in order; both skip the same invalid rows)."""
        row = self._next_row
        if list(self._rows["images"][row] or []) != list(images or []):
            raise RuntimeError(f"row {row}: the box columns and the host's packing disagree on the images")
        self._next_row += 1
        return list(self._rows["input_ids"][row]), list(self._rows["labels"][row])
