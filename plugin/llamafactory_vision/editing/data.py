"""The ``edit`` dataset format, its processor and collator.

A row (column names mappable through ``columns`` in dataset_info.json)::

    {"source": "in.png", "instruction": "make it snowy", "target": "out.png",
     "expressive": "...",        # optional: the longer instruction the MLLM learns to write (default: instruction)
     "target_caption": "..."}    # optional: describes the edited image; CLIP-T scores against it

becomes a LLaVA conversation (MGIE's prompt) whose target is the expressive instruction followed by ``[IMG0]``..
``[IMG7]``, plus columns the host's processors drop (target path, caption, a per-row key that seeds the diffusion
draws). Rows are validated here, where data enters: an error names dataset, row and field, or (``edit_invalid:
skip``) the row is dropped and counted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
from llamafactory.data.converter import DatasetConverter
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.extras.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from PIL import Image, ImageOps, UnidentifiedImageError

from llamafactory_vision.dataset_rows import SKIP_COLUMN, RowError, align_with_row_checks
from llamafactory_vision.editing.tokens import PROMPT, img_token_ids, target_text
from llamafactory_vision.log import get_logger

logger = get_logger(__name__)

EDIT_FORMAT = "edit"
# Columns from the converter to the processor (underscored like the host's) and from the processor to the collator.
CONVERTED = ("_edit_target", "_edit_instruction", "_edit_caption", "_edit_key")
EDIT_COLUMNS = ("edit_source", "edit_target", "edit_instruction", "edit_caption", "edit_key")


class EditDataError(RowError):
    """An invalid edit row; ``reason`` is a short key used to count skipped rows."""

    kind = "edit"


def row_key(dataset: str, row: int | None) -> int:
    """A stable 62-bit key of one dataset row (seeds its diffusion draws; see diffusion.py)."""
    digest = hashlib.blake2b(f"{dataset}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class EditDatasetConverter(DatasetConverter):
    """Converts one edit row into the host's aligned columns plus ``CONVERTED``."""

    def _fail(self, row: int | None, field: str, message: str, reason: str) -> EditDataError:
        return EditDataError(self.dataset_attr.dataset_name, row, field, message, reason)

    def _image(self, example: dict[str, Any], row: int | None, field: str) -> str:
        value = example.get(field)
        if not isinstance(value, str) or not value:
            raise self._fail(row, field, f"expected an image path, got {value!r}", "missing_image")
        (path,) = self._find_medias([value])
        if not os.path.isfile(path):
            raise self._fail(row, field, f"image file not found: {path!r}", "missing_image")
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise self._fail(row, field, f"cannot read image {path!r}: {err}", "corrupt_image") from err
        if width < 1 or height < 1:
            raise self._fail(row, field, f"unreadable image size {width}x{height} in {path!r}", "bad_size")
        return path

    def _text(self, example: dict[str, Any], row: int | None, field: str, required: bool) -> str:
        value = example.get(field)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise self._fail(row, field, f"expected a non-empty string, got {value!r}", f"bad_{field}")
        return value.strip()

    def convert(self, example: dict[str, Any], row: int | None) -> dict[str, Any]:
        attr = self.dataset_attr
        source = self._image(example, row, attr.source)
        target = self._image(example, row, attr.target)
        instruction = self._text(example, row, attr.instruction, required=True)
        expressive = self._text(example, row, attr.expressive, required=False) or instruction
        caption = self._text(example, row, attr.target_caption, required=False)
        prompt = IMAGE_PLACEHOLDER + PROMPT.format(instruction=instruction)
        return {
            "_prompt": [{"role": "user", "content": prompt}],
            "_response": [{"role": "assistant", "content": target_text(expressive)}],
            "_system": "",
            "_tools": "",
            "_images": [source],
            "_videos": None,
            "_audios": None,
            "_edit_target": target,
            "_edit_instruction": instruction,
            "_edit_caption": caption,
            "_edit_key": row_key(attr.dataset_name, row),
        }

    def __call__(self, example: dict[str, Any], row: int | None = None) -> dict[str, Any]:
        try:
            return {**self.convert(example, row), SKIP_COLUMN: ""}
        except EditDataError as err:
            if self.data_args.edit_invalid == "error":
                raise
            logger.info_rank0(f"skipping: {err}")
            empty = {"_prompt": [], "_response": [], "_system": "", "_tools": "", "_images": None, "_videos": None}
            edit = {"_edit_target": "", "_edit_instruction": "", "_edit_caption": "", "_edit_key": 0}
            return {**empty, "_audios": None, **edit, SKIP_COLUMN: err.reason}


def align_edit_dataset(dataset, dataset_attr, data_args, training_args):
    """``align_dataset`` for ``formatting: edit``: row-indexed conversion and counted skips."""
    return align_with_row_checks(dataset, dataset_attr, data_args, training_args, EDIT_FORMAT, "edit_invalid")


@dataclass
class EditDatasetProcessor(SupervisedDatasetProcessor):
    """The host's supervised processor, row by row, plus ``EDIT_COLUMNS``. A row whose ``[IMG]`` tokens were cut by
    ``cutoff_len`` is an error (the edit head would have nothing to read)."""

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if "_edit_target" not in examples:
            raise ValueError("`stage: edit` needs datasets with `formatting: edit` in dataset_info.json.")
        img_ids = set(img_token_ids(self.tokenizer))
        outputs: dict[str, list[Any]] = {}
        for i in range(len(examples["_prompt"])):
            row = super().preprocess_dataset({key: values[i : i + 1] for key, values in examples.items()})
            if not row.get("input_ids"):
                continue  # the host dropped it (and said why)
            if not img_ids <= {t for t in row["labels"][0] if t != IGNORE_INDEX}:
                raise ValueError(
                    f"edit row {examples['_edit_instruction'][i]!r}: the [IMG] tokens were cut off by `cutoff_len` "
                    f"({self.data_args.cutoff_len}); raise it or shorten the expressive instruction."
                )
            row["edit_source"] = [examples["_images"][i][0]]
            row["edit_target"] = [examples["_edit_target"][i]]
            row["edit_instruction"] = [examples["_edit_instruction"][i]]
            row["edit_caption"] = [examples["_edit_caption"][i]]
            row["edit_key"] = [examples["_edit_key"][i]]
            for key, values in row.items():
                outputs.setdefault(key, []).extend(values)
        return outputs


def load_edit_image(path: str, resolution: int) -> torch.Tensor:
    """An image file -> ``Tensor[3, R, R]`` in [-1, 1]: scaled to cover R x R (bicubic) and centre-cropped, the same
    way for source and target so that they stay aligned."""
    with Image.open(path) as image:
        square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def img_positions(input_ids: torch.Tensor, img_ids: list[int]) -> torch.Tensor:
    """Positions of the hidden states the edit head reads: the one before each ``[IMGk]`` (the state that predicts
    it, as MGIE). input_ids: ``LongTensor[B, L]`` with each [IMG] token once per row -> ``LongTensor[B, 8]``."""
    ids = torch.tensor(img_ids, device=input_ids.device)
    hits = input_ids[:, :, None] == ids[None, None, :]  # [B, L, 8]
    if not bool((hits.sum(dim=1) == 1).all()):
        raise ValueError("every edit row must hold each [IMG] token exactly once.")
    return hits.float().argmax(dim=1) - 1


@dataclass
class EditCollator(SFTDataCollatorWith4DAttentionMask):
    """The host's SFT collator plus ``edit_source_pixels``/``edit_target_pixels`` (``Tensor[B, 3, R, R]`` in
    [-1, 1]), ``edit_positions`` (``LongTensor[B, 8]``, see :func:`img_positions`) and ``edit_keys``
    (``LongTensor[B]``)."""

    resolution: int = 256

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{k: v for k, v in f.items() if k not in EDIT_COLUMNS} for f in features])
        batch["edit_source_pixels"] = torch.stack([load_edit_image(f["edit_source"], self.resolution) for f in features])
        batch["edit_target_pixels"] = torch.stack([load_edit_image(f["edit_target"], self.resolution) for f in features])
        batch["edit_positions"] = img_positions(batch["input_ids"], img_token_ids(self.tokenizer))
        batch["edit_keys"] = torch.tensor([f["edit_key"] for f in features], dtype=torch.long)
        return batch
