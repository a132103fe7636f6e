"""The `grounding` dataset format: conversion, validation errors naming dataset/row/field, counted skips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli, train_config, write_yaml
from llamafactory_vision.grounding.data import GroundingDataError, GroundingDatasetConverter, align_grounding_dataset
from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr
from llamafactory_vision.grounding.markers import marker_objects
from llamafactory_vision.hparams import VisionDataArguments
from PIL import Image

W, H = 200, 100


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    Image.new("RGB", (W, H), (10, 20, 30)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    for name, data in _broken_pngs(tmp_path / "ok.png").items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _broken_pngs(valid: Path) -> dict[str, bytes]:
    """PNGs whose header reads but whose image data PIL's ``verify()`` refuses: a changed byte in the image data
    (bad CRC), cut before IEND, cut inside a CRC."""
    data = valid.read_bytes()
    idat = data.index(b"IDAT") + 6
    return {
        "bad_crc.png": data[:idat] + bytes([data[idat] ^ 1]) + data[idat + 1 :],
        "no_iend.png": data[: data.rindex(b"IEND") - 4],
        "cut_crc.png": data[: data.rindex(b"IEND") - 6],
    }


def _converter(image_dir: Path, invalid: str = "error", columns: dict | None = None) -> GroundingDatasetConverter:
    attr = GroundingDatasetAttr("file", dataset_name="rows.jsonl")
    attr.join({"file_name": "rows.jsonl", "formatting": "grounding", "columns": columns or {}})
    data_args = VisionDataArguments(template="qwen2_vl_ground", dataset_dir=str(image_dir), grounding_invalid=invalid)
    return GroundingDatasetConverter(attr, data_args)


def _row(**overrides) -> dict:
    return {"images": ["ok.png"], "objects": [{"ref": "the box", "bbox": [20, 10, 120, 90]}], **overrides}


def test_converts_pixel_boxes_to_normalised_markers(image_dir):
    out = _converter(image_dir)(_row(bbox_format="xywh", objects=[{"ref": "a", "bbox": [20, 10, 100, 80]}]), 0)
    assert out["_images"] == [str(image_dir / "ok.png")]
    assert out["_prompt"][0]["content"].startswith("<image>")
    (obj,) = marker_objects(out["_response"][0]["content"])
    assert obj.ref == "a"
    assert obj.box == pytest.approx((20 / W, 10 / H, 120 / W, 90 / H))


def test_prompt_choice_is_deterministic_and_user_prompt_wins(image_dir):
    conv = _converter(image_dir)
    assert conv(_row(), 0)["_prompt"] == conv(_row(), 5)["_prompt"]
    custom = conv(_row(prompt="Box for {ref}, please."), 0)["_prompt"][0]["content"]
    assert custom == "<image>Box for the box, please."


def test_prompt_wording_does_not_depend_on_where_the_dataset_lies(tmp_path):
    """Rows pick one of the spec's phrasings by a hash: the same row in another folder (another machine, pytest's
    temp dirs) must get the same wording, or runs are not reproducible across machines."""
    refs = [f"object {i}" for i in range(12)]  # several rows, so different keys pick different phrasings
    prompts = []
    for folder in (tmp_path / "a", tmp_path / "deeper" / "b"):
        folder.mkdir(parents=True)
        Image.new("RGB", (W, H), (10, 20, 30)).save(folder / "ok.png")
        conv = _converter(folder)
        prompts.append([conv(_row(objects=[{"ref": ref, "bbox": [20, 10, 120, 90]}]), i)["_prompt"] for i, ref in
                        enumerate(refs)])  # fmt: skip
    assert prompts[0] == prompts[1]
    assert len({p[0]["content"].replace(ref, "{ref}") for p, ref in zip(prompts[0], refs)}) > 1

def test_reg_task_puts_the_region_in_the_prompt_and_the_ref_in_the_answer(image_dir):
    out = _converter(image_dir)(_row(task="reg"), 0)
    assert "⟦lfv:region 0 " in out["_prompt"][0]["content"]
    assert out["_response"][0]["content"] == "the box"


def test_single_image_column_and_column_mapping(image_dir):
    conv = _converter(image_dir, columns={"image": "img", "objects": "boxes"})
    row = {"img": "ok.png", "boxes": [{"ref": "x", "bbox": [0, 0, W, H]}]}
    assert conv(row, 3)["_images"] == [str(image_dir / "ok.png")]


BAD_ROWS = [
    ("outside_image", {"objects": [{"ref": "a", "bbox": [0, 0, W + 1, 10]}]}, "objects[0].bbox"),
    ("outside_image", {"objects": [{"ref": "a", "bbox": [-1, 0, 10, 10]}]}, "objects[0].bbox"),
    ("degenerate", {"objects": [{"ref": "a", "bbox": [50, 0, 40, 10]}]}, "objects[0].bbox"),
    ("not_finite", {"objects": [{"ref": "a", "bbox": [math.nan, 0, 40, 10]}]}, "objects[0].bbox"),
    ("not_finite", {"objects": [{"ref": "a", "bbox": [0, 0, math.inf, 10]}]}, "objects[0].bbox"),
    ("not_numeric", {"objects": [{"ref": "a", "bbox": ["x", 0, 40, 10]}]}, "objects[0].bbox"),
    ("wrong_length", {"objects": [{"ref": "a", "bbox": [0, 0, 40]}]}, "objects[0].bbox"),
    ("unknown_format", {"bbox_format": "yxyx"}, "bbox_format"),
    ("no_objects", {"objects": []}, "objects"),
    ("no_objects", {"objects": None}, "objects"),
    ("bad_ref", {"objects": [{"ref": "", "bbox": [0, 0, 4, 4]}]}, "objects[0].ref"),
    ("missing_image", {"images": ["nope.png"]}, "images"),
    ("missing_image", {"images": []}, "images"),
    ("corrupt_image", {"images": ["corrupt.png"]}, "images"),
    ("corrupt_image", {"images": ["bad_crc.png"]}, "images"),
    ("corrupt_image", {"images": ["no_iend.png"]}, "images"),
    ("corrupt_image", {"images": ["cut_crc.png"]}, "images"),
    ("image_count", {"images": ["ok.png", "ok.png"]}, "images"),
    ("unknown_task", {"task": "caption"}, "task"),
]


@pytest.mark.parametrize("reason,overrides,field", BAD_ROWS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_ROWS)])
def test_bad_input_names_dataset_row_and_field(image_dir, reason, overrides, field):
    with pytest.raises(GroundingDataError) as err:
        _converter(image_dir)(_row(**overrides), 7)
    assert err.value.reason == reason
    message = str(err.value)
    assert "'rows.jsonl'" in message and "row 7" in message and f"field `{field}`" in message


@pytest.mark.parametrize("name", ["corrupt.png", "bad_crc.png", "no_iend.png", "cut_crc.png"])
def test_corrupt_image_errors_equal_pils_open_and_verify(image_dir, name, monkeypatch):
    """The converter checks images without PIL where it can (image_header.verified_size); a corrupt file gets the
    error PIL's open + verify() gives (oracle: the converter with that check switched off)."""
    from llamafactory_vision.grounding import data

    with pytest.raises(GroundingDataError) as fast:
        _converter(image_dir)(_row(images=[name]), 3)
    monkeypatch.setattr(data, "verified_size", lambda _path: None)
    with pytest.raises(GroundingDataError) as pil_only:
        _converter(image_dir)(_row(images=[name]), 3)
    assert str(fast.value) == str(pil_only.value)
    assert "cannot read image" in str(fast.value) and fast.value.reason == "corrupt_image"


def test_batched_conversion_equals_the_row_by_row_map(image_dir):
    """Our formats convert in a batched ``map`` (dataset_rows.BatchedConverter); oracle: the host's way, one row per
    call. The same columns, types and rows, in order, with skipped rows (all-``None`` images) among kept ones."""
    from datasets import Dataset
    from llamafactory_vision.dataset_rows import BatchedConverter

    rows = [_row(objects=[]), _row(), _row(images=["nope.png"]), _row(task="reg", objects=[_row()["objects"][0]])]
    rows = [{**r, "bbox_format": "xyxy", "task": r.get("task", "rec")} for r in rows]
    dataset, converter = Dataset.from_list(rows), _converter(image_dir, "skip")
    kwargs = {"with_indices": True, "remove_columns": dataset.column_names, "load_from_cache_file": False}
    by_row = dataset.map(converter, batched=False, **kwargs)
    batched = dataset.map(BatchedConverter(converter), batched=True, **kwargs)
    assert batched.features == by_row.features
    assert batched.to_list() == by_row.to_list()
    assert [row["_lfv_skip"] for row in batched] == ["no_objects", "", "missing_image", ""]


def test_skip_mode_drops_and_counts_invalid_rows(image_dir, caplog, tmp_path):
    from datasets import Dataset

    rows = [_row(), _row(objects=[]), _row(images=["nope.png"]), _row(), _row(bbox_format="yxyx")]
    rows = [{**r, "bbox_format": r.get("bbox_format", "xyxy"), "task": "rec"} for r in rows]
    attr = GroundingDatasetAttr("file", dataset_name="rows.jsonl")
    attr.join({"file_name": "rows.jsonl", "formatting": "grounding"})
    data_args = VisionDataArguments(template="qwen2_vl_ground", dataset_dir=str(image_dir), grounding_invalid="skip")

    class _TrainingArgs:
        local_process_index = 0
        output_dir = str(tmp_path / "out")

    aligned = align_grounding_dataset(Dataset.from_list(rows), attr, data_args, _TrainingArgs())
    assert len(aligned) == 2
    assert "_lfv_skip" not in aligned.column_names
    report = caplog.text
    assert "skipped 3 of 5 rows (1 missing_image, 1 no_objects, 1 unknown_format): rows 1, 2, 4" in report
    assert "rows count from 0" in report
    written = json.loads((tmp_path / "out" / "grounding_skipped_rows" / "rows.jsonl.json").read_text())
    assert written["rows_count_from"] == 0 and written["total_rows"] == 5
    assert written["skipped"] == [
        {"row": 1, "reason": "no_objects"},
        {"row": 2, "reason": "missing_image"},
        {"row": 4, "reason": "unknown_format"},
    ]


def test_grounding_format_needs_a_grounding_template(image_dir):
    attr = GroundingDatasetAttr("file", dataset_name="rows.jsonl")
    attr.join({"file_name": "rows.jsonl", "formatting": "grounding"})
    with pytest.raises(ValueError, match="needs a grounding template"):
        GroundingDatasetConverter(attr, VisionDataArguments(template="qwen2_vl", dataset_dir=str(image_dir)))


def _bad_dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H)).save(root / "ok.png")
    rows = [_row(), _row(objects=[{"ref": "a", "bbox": [0, 0, 10, H + 5]}])]
    (root / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "dataset_info.json").write_text(json.dumps({"synth_ground_train": {"file_name": "bad.jsonl",
                                                                                "formatting": "grounding"}}))  # fmt: skip
    return root


@pytest.mark.e2e
def test_cli_stops_at_the_bad_row_or_skips_it_when_asked(tmp_path, tiny_models):
    data = _bad_dataset(tmp_path / "data")
    config = train_config(tiny_models["qwen2_vl"], data, tmp_path / "out", "qwen2_vl_ground", max_steps=1)
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "a.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    assert "grounding dataset 'bad.jsonl', row 1 (counting from 0), field `objects[0].bbox`" in result.stderr
    assert "outside" in result.stderr

    config.update(grounding_invalid="skip", output_dir=str(tmp_path / "out2"))
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "b.yaml", config))], tmp_path)
    assert "skipped 1 of 2 rows (1 outside_image): rows 1 (rows count from 0" in result.stdout + result.stderr
    skipped = json.loads((tmp_path / "out2" / "grounding_skipped_rows" / "bad.jsonl.json").read_text())
    assert skipped["skipped"] == [{"row": 1, "reason": "outside_image"}]


@pytest.mark.e2e
def test_wrong_template_for_the_model_and_unknown_yaml_key_fail_at_start(tmp_path, tiny_models, demo_data):
    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path / "out", "qwen2_5_vl_ground")
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "a.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    assert "template 'qwen2_5_vl_ground' writes qwen2_5_vl boxes and needs a model of type qwen2_5_vl" in result.stderr

    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path / "out", "qwen2_vl_ground", grounding_invalidd=1)
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "b.yaml", config))], tmp_path, check=False)
    assert result.returncode != 0
    assert "grounding_invalidd" in result.stderr
