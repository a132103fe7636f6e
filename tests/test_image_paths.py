"""A missing image names every place LLaMA-Factory's media lookup searched (media_dir / dataset_dir, and the path
from the working directory), so a wrong `dataset_dir` or `media_dir` is visible in the error."""

from __future__ import annotations

import os

import pytest
from llamafactory_vision.grounding.data import GroundingDataError, GroundingDatasetConverter
from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr
from llamafactory_vision.hparams import VisionDataArguments

ROW = {"images": ["pics/nope.png"], "objects": [{"ref": "a", "bbox": [0, 0, 4, 4]}]}


def _converter(**data_args) -> GroundingDatasetConverter:
    attr = GroundingDatasetAttr("file", dataset_name="rows.jsonl")
    attr.join({"file_name": "rows.jsonl", "formatting": "grounding"})
    return GroundingDatasetConverter(attr, VisionDataArguments(template="qwen2_vl_ground", **data_args))


@pytest.mark.parametrize("media_dir", [None, "media"])
def test_missing_image_names_the_folders_searched(tmp_path, monkeypatch, media_dir):
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    converter = _converter(dataset_dir=str(data_dir), media_dir=media_dir)
    with pytest.raises(GroundingDataError) as error:
        converter(ROW, 4)
    message = str(error.value)
    assert "row 4 (counting from 0), field `images`: image file not found: 'pics/nope.png'; searched" in message
    if media_dir is None:
        searched = str(data_dir / "pics" / "nope.png")
        assert f"{searched!r} (in `dataset_dir` (no `media_dir` set) {str(data_dir)!r})" in message
    else:
        assert f"{os.path.abspath('media/pics/nope.png')!r} (in `media_dir` 'media')" in message
    assert f"{str(tmp_path / 'pics' / 'nope.png')!r} (from the working directory)" in message
