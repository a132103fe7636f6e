"""The `edit` format: conversion, errors naming dataset/row/field, counted skips, column renames, template, keys."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from conftest import edit_config
from datasets import Dataset
from llamafactory_vision.editing.tokens import IMG_TOKENS
from PIL import Image


def _attr(columns: dict | None = None):
    from llamafactory.data.parser import DatasetAttr  # our EditDatasetAttr, installed by patches.py

    attr = DatasetAttr("file", dataset_name="my_edits")
    attr.join({"formatting": "edit", "columns": columns or {}})
    return attr


def _data_args(tmp_path, invalid="error"):
    from llamafactory.hparams import DataArguments  # the host's parser uses our subclass; build it directly here
    from llamafactory_vision.hparams import VisionDataArguments

    assert issubclass(VisionDataArguments, DataArguments)
    return VisionDataArguments(template="llava_edit", dataset_dir=str(tmp_path), edit_invalid=invalid)


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "a.png")
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _convert(tmp_path, rows, invalid="error", columns=None):
    from llamafactory_vision.editing.data import align_edit_dataset

    training_args = types.SimpleNamespace(local_process_index=0)
    return align_edit_dataset(Dataset.from_list(rows), _attr(columns), _data_args(tmp_path, invalid), training_args)


def test_good_row_becomes_an_mgie_conversation(images):
    rows = [{"source": "a.png", "instruction": "make the circle blue", "target": "b.png", "target_caption": "blue"}]
    (row,) = _convert(images, rows)
    assert row["_prompt"][0]["content"] == "<image>what will this image be like if 'make the circle blue'"
    assert row["_response"][0]["content"] == "make the circle blue " + " ".join(IMG_TOKENS)  # expressive defaults
    assert row["_images"] == [str(images / "a.png")] and row["_edit_target"] == str(images / "b.png")
    assert row["_edit_caption"] == "blue"


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"target": "missing.png"}, "target", "image file not found"),
        ({"source": "broken.png"}, "source", "cannot read image"),
        ({"instruction": "   "}, "instruction", "non-empty string"),
        ({"source": ""}, "source", "expected an image path"),
    ],
)
def test_bad_row_names_dataset_row_and_field(images, bad, field, reason):
    good = {"source": "a.png", "instruction": "x", "target": "b.png"}
    with pytest.raises(ValueError, match=rf"edit dataset 'my_edits', row 1 \(counting from 0\), field `{field}`: .*{reason}"):
        _convert(images, [good, {**good, **bad}])


def test_skip_drops_and_keeps_the_rest(images):
    good = {"source": "a.png", "instruction": "x", "target": "b.png"}
    rows = [good, {**good, "target": "missing.png"}, {**good, "source": "broken.png"}, {**good, "instruction": ""}, good]
    converted = _convert(images, rows, invalid="skip")
    assert len(converted) == 2 and "_lfv_skip" not in converted.column_names


def test_columns_can_be_renamed(images):
    rows = [{"input_image": "a.png", "edit": "make it blue", "edited_image": "b.png", "output": "a blue image"}]
    columns = {"source": "input_image", "instruction": "edit", "target": "edited_image", "target_caption": "output"}
    (row,) = _convert(images, rows, columns=columns)
    assert row["_edit_instruction"] == "make it blue" and row["_edit_caption"] == "a blue image"


def test_llava_edit_template_is_llava_with_its_own_plugin():
    from llamafactory.data.template import TEMPLATES

    edit, base = TEMPLATES["llava_edit"], TEMPLATES["llava"]
    assert edit.format_user is base.format_user and edit.default_system == base.default_system
    assert edit.mm_plugin is not base.mm_plugin and type(edit.mm_plugin) is type(base.mm_plugin)


def test_stage_edit_refuses_other_templates(edit_models, edit_data, tmp_path):
    from llamafactory.hparams import get_train_args

    def plain(config):  # Paths as strings, as from a YAML file
        return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}

    config = plain(edit_config(edit_models, edit_data, tmp_path, template="llava"))
    with pytest.raises(ValueError, match="`stage: edit` needs `template: llava_edit`"):
        get_train_args(config)
    config = plain(edit_config(edit_models, edit_data, tmp_path))
    config.pop("diffusion_model_name_or_path")
    with pytest.raises(ValueError, match="needs `diffusion_model_name_or_path`"):
        get_train_args(config)
