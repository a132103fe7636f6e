"""Grounding predict with traceable rows: the host's ``CustomSeq2SeqTrainer`` whose generated rows carry their dataset
row index, model-view image size and the dataset's float label boxes (see head_rows.py).

The workflow uses it for every grounding run that generates (``predict_with_generate``); the bbox head's trainer
(trainer.py) extends it with the head's boxes. Training and the loss are the host's: only ``prediction_step`` (rows
packed beside the generated tokens, so the host's gather carries them) and ``save_predictions`` (``row`` and ``image``
on each line of ``generated_predictions.jsonl``) differ.
"""

from __future__ import annotations

import json
import math
import os

import torch
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from typing_extensions import override

from llamafactory_vision.grounding.head_rows import (
    LABEL_BOXES_COLUMN,
    ROW_COLUMN,
    HeadBox,
    PredictRow,
    first_occurrences,
    pack_head_rows,
    unpack_head_rows,
)
from llamafactory_vision.log import get_logger

logger = get_logger(__name__)


class GroundingPredictTrainer(CustomSeq2SeqTrainer):
    def __init__(self, *args, **kwargs):
        self.mm_processor = kwargs["processor"]
        super().__init__(*args, **kwargs)

    def _generated_head_boxes(self, model, inputs, generated, row_ids) -> list[list[HeadBox] | None]:
        """Per generated row, its head boxes (see ``PredictRow.head``): none, without a head."""
        return [[] for _ in range(generated.size(0))]

    def _traced_fields(self, predicted: PredictRow) -> dict:
        """Fields written after the host's ones on a row of ``generated_predictions.jsonl``: none without a head."""
        return {}

    @override
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """With generation, the predictions are ``(generated tokens, packed rows)`` (see head_rows.py): the host's
        loop gathers both alike, so each row's index, model-view size, dataset label boxes (and head boxes) stay with
        its text."""
        row_ids, label_boxes = inputs.get(ROW_COLUMN), inputs.get(LABEL_BOXES_COLUMN)
        inputs = {k: v for k, v in inputs.items() if k not in (ROW_COLUMN, LABEL_BOXES_COLUMN)}
        loss, generated, labels = super().prediction_step(
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
        )
        if generated is not None and self.args.predict_with_generate:
            size = generated.size(0)
            # a dataset built without the workflow's columns: rows in loader order, scored on the label text
            row_ids = row_ids.tolist() if row_ids is not None else [-1] * size
            if label_boxes is None:
                logger.warning_rank0_once(
                    f"The generation set has no `{LABEL_BOXES_COLUMN}` column (it was tokenized by stock "
                    "LLaMA-Factory or an older llamafactory-vision, e.g. reloaded from `tokenized_path`): predictions "
                    "are scored on the label text, whose boxes are rounded to the model family's grid, not on the "
                    "dataset's float boxes. Tokenize it again (`overwrite_cache: true`, a new `tokenized_path`) to "
                    "score against the dataset's boxes."
                )
            labels_of = _label_boxes(label_boxes) if label_boxes is not None else [None] * size
            heads = self._generated_head_boxes(model, inputs, generated, row_ids)
            rows = [PredictRow(*values) for values in zip(row_ids, heads, self._model_sizes(inputs), labels_of)]
            generated = (generated, pack_head_rows(rows).to(generated.device))
        return loss, generated, labels

    def _image_ranges(self, input_ids: torch.Tensor) -> list[range]:
        """Per row of the batch, the indices of its images in ``image_grid_thw`` (each image is one run of image
        tokens in the prompt; images are listed row by row)."""
        image = input_ids == self.accelerator.unwrap_model(self.model).config.image_token_id
        starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
        ranges, first = [], 0
        for count in starts.sum(dim=1).tolist():
            ranges.append(range(first, first + count))
            first += count
        return ranges

    def _model_sizes(self, inputs) -> list[tuple[int, int]]:
        """Per row, ``(width, height)`` in pixels of its (first) image as the model sees it; ``(0, 0)`` without one."""
        grid, patch = inputs.get("image_grid_thw"), self.mm_processor.image_processor.patch_size
        return [
            (int(grid[r[0], 2]) * patch, int(grid[r[0], 1]) * patch) if r else (0, 0)
            for r in self._image_ranges(inputs["input_ids"])
        ]

    @override
    def save_predictions(self, dataset, predict_results, skip_special_tokens=True) -> None:
        """The host's ``generated_predictions.jsonl`` in dataset order, each row then given its dataset ``row`` index
        (from 0) and ``image`` (its first), both gathered with its generated text, then :meth:`_traced_fields`.

        The sampler's repeats (to even out processes) go, and the rows are put in dataset order before the host
        writes them, since the host pairs the i-th prediction with the i-th prompt of ``dataset``."""
        tokens, packed = predict_results.predictions
        predicted = unpack_head_rows(packed)
        keep = first_occurrences([r.row for r in predicted])
        if all(predicted[i].row >= 0 for i in keep):
            keep.sort(key=lambda i: predicted[i].row)
        kept_rows = [predicted[i] for i in keep]
        kept = predict_results._replace(predictions=tokens[keep], label_ids=predict_results.label_ids[keep])
        super().save_predictions(dataset, kept, skip_special_tokens)
        if not self.is_world_process_zero():
            return
        images = dataset["images"] if "images" in dataset.column_names else [None] * len(dataset)
        path = os.path.join(self.args.output_dir, "generated_predictions.jsonl")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        with open(path, "w", encoding="utf-8") as f:
            for row, predicted in zip(rows, kept_rows, strict=True):
                row_id = predicted.row
                image = images[row_id][0] if row_id >= 0 and images[row_id] else None
                traced = {"row": row_id, "image": image, **row, **self._traced_fields(predicted)}
                f.write(json.dumps(traced, ensure_ascii=False) + "\n")


def _label_boxes(boxes: torch.Tensor) -> list[list[tuple[float, float, float, float]]]:
    """``Float64Tensor[B, M, 4]`` NaN-padded label boxes (see ``GroundingBBoxCollator``) -> per row its boxes."""
    return [[tuple(box) for box in row.tolist() if not any(math.isnan(v) for v in box)] for row in boxes.cpu()]
