"""Box targets for the bbox head: a dataset processor that keeps them and a collator that batches them.

The host's supervised processor keeps fixed keys only, so boxes travel in two extra columns, aligned with the boxes
in the target text:

- ``bbox_spans``: ``[[open, close], ...]`` token indices of each box in ``input_ids`` (see ``find_box_spans``);
- ``bbox_targets``: ``[[cx, cy, w, h], ...]`` in [0, 1] of the image (model view and original alike).

Boxes cut off by ``cutoff_len`` have no span and are dropped from both lists; ``bbox_cut`` counts them per row.

For generation (predict) the rows are prompts only, as the host writes them, plus ``lfv_label_boxes``: the row's label
boxes as the dataset gives them (``xyxy`` floats in [0, 1] of the image, not the label text rounded to the family's
grid), which predict scores against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.data.processor.unsupervised import UnsupervisedDatasetProcessor
from llamafactory.extras.constants import IGNORE_INDEX

from llamafactory_vision.boxes import from_xyxy
from llamafactory_vision.grounding.bbox_head import find_box_spans
from llamafactory_vision.grounding.formats import get_codec
from llamafactory_vision.grounding.head_rows import LABEL_BOXES_COLUMN, ROW_COLUMN
from llamafactory_vision.grounding.markers import marker_objects

BBOX_COLUMNS = ("bbox_spans", "bbox_targets", "bbox_cut")
BBOX_STAGE = "sft_bbox_head"  # the `stage` our workflow passes to the host's get_dataset (see patches.py)
# The `stage` of a grounding run without the head: the host's SFT processors, and for generation
# GroundingGenerationDatasetProcessor (the label boxes predict scores against).
ROWS_STAGE = "sft_grounding_rows"


@dataclass
class GroundingBBoxDatasetProcessor(SupervisedDatasetProcessor):
    """The host's supervised processor, row by row, plus the box columns."""

    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    def _decode(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        codec = get_codec(self.template.mm_plugin.box_family)
        outputs: dict[str, list[Any]] = {}
        for i in range(len(examples["_prompt"])):
            row = super().preprocess_dataset({key: values[i : i + 1] for key, values in examples.items()})
            if not row.get("input_ids"):
                continue  # the host dropped it (and said why)
            targets = [list(from_xyxy(o.box, "cxcywh")) for o in marker_objects(examples["_response"][i][0]["content"])]
            positions = [p for p, label in enumerate(row["labels"][0]) if label != IGNORE_INDEX]
            spans = find_box_spans([self._decode(row["input_ids"][0][p]) for p in positions], codec.box_pattern)
            if len(spans) > len(targets):
                raise ValueError(f"found {len(spans)} boxes in the target text but the row has {len(targets)} objects.")
            row["bbox_spans"] = [[[positions[o], positions[c]] for o, c in spans]]
            row["bbox_targets"] = [targets[: len(spans)]]
            row["bbox_cut"] = [len(targets) - len(spans)]
            for key, values in row.items():
                outputs.setdefault(key, []).extend(values)
        return outputs


class GroundingGenerationDatasetProcessor(UnsupervisedDatasetProcessor):
    """The host's generation (prompt-only) processor, row by row, plus the ``lfv_label_boxes`` column."""

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        outputs: dict[str, list[Any]] = {}
        for i in range(len(examples["_prompt"])):
            row = super().preprocess_dataset({key: values[i : i + 1] for key, values in examples.items()})
            if not row.get("input_ids"):
                continue  # the host dropped it (and said why)
            response = examples["_response"][i]
            # a reg row's answer is its phrase: no marker, no label box
            objects = marker_objects(response[0]["content"]) if len(response) == 1 else []
            row[LABEL_BOXES_COLUMN] = [[list(o.box) for o in objects]]
            for key, values in row.items():
                outputs.setdefault(key, []).extend(values)
        return outputs


@dataclass
class GroundingBBoxCollator(SFTDataCollatorWith4DAttentionMask):
    """The host's SFT collator plus padded ``bbox_spans`` (``LongTensor[B, K, 2]``, -1 = none) and ``bbox_targets``
    (``FloatTensor[B, K, 4]``). Rows for generation (prompt only, no targets) are collated as the host does, plus
    their dataset row index (``lfv_row``, ``LongTensor[B]``) and label boxes (``lfv_label_boxes``,
    ``Float64Tensor[B, M, 4]``, NaN past a row's boxes) when the dataset has those columns."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = {}
        if ROW_COLUMN in features[0]:
            extra[ROW_COLUMN] = torch.tensor([f[ROW_COLUMN] for f in features], dtype=torch.long)
        if LABEL_BOXES_COLUMN in features[0]:
            labels = [f[LABEL_BOXES_COLUMN] for f in features]
            boxes = torch.full((len(features), max(map(len, labels), default=0), 4), torch.nan, dtype=torch.float64)
            for i, row_boxes in enumerate(labels):
                if row_boxes:
                    boxes[i, : len(row_boxes)] = torch.tensor(row_boxes, dtype=torch.float64)
            extra[LABEL_BOXES_COLUMN] = boxes
        if extra:
            batch = self([{k: v for k, v in f.items() if k not in extra} for f in features])
            return {**batch, **extra}
        if "bbox_spans" not in features[0]:
            return super().__call__(features)
        spans = [f["bbox_spans"] for f in features]
        targets = [f["bbox_targets"] for f in features]
        lengths = [len(f["input_ids"]) for f in features]
        batch = super().__call__([{k: v for k, v in f.items() if k not in BBOX_COLUMNS} for f in features])
        slots = max((len(s) for s in spans), default=0)
        batch["bbox_spans"] = torch.full((len(features), slots, 2), -1, dtype=torch.long)
        batch["bbox_targets"] = torch.zeros((len(features), slots, 4), dtype=torch.float32)
        padded = batch["input_ids"].size(1)
        for i, (row_spans, row_targets) in enumerate(zip(spans, targets)):
            if row_spans:
                shift = padded - lengths[i] if self.tokenizer.padding_side == "left" else 0
                batch["bbox_spans"][i, : len(row_spans)] = torch.tensor(row_spans) + shift
                batch["bbox_targets"][i, : len(row_targets)] = torch.tensor(row_targets)
        return batch
