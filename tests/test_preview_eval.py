"""``llamafactory-vision preview`` on a predict YAML (only an ``eval_dataset``) draws the eval set: it used to stop
with the host's 'Please specify dataset for training'."""

from __future__ import annotations

import pytest
from conftest import read_jsonl, run_cli, train_config, write_yaml
from llamafactory_vision.boxes import to_xyxy
from PIL import Image

pytestmark = pytest.mark.e2e


def test_preview_of_a_predict_yaml_draws_the_eval_set(tiny_models, demo_data, tmp_path):
    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path / "pred", "qwen2_vl_ground",
                          do_train=False, do_predict=True, predict_with_generate=True, max_new_tokens=16)  # fmt: skip
    del config["dataset"]
    config["eval_dataset"] = "synth_ground_val"
    predict_yaml = write_yaml(tmp_path / "predict.yaml", config)
    result = run_cli(["llamafactory-vision", "preview", str(predict_yaml), "--out", "prev", "--n", "3"], tmp_path)
    assert "preview written to" in result.stdout

    val_rows = read_jsonl(demo_data / "ground_val.jsonl")[:3]
    previews = read_jsonl(tmp_path / "prev" / "preview.jsonl")
    assert [p["image"] for p in previews] == [str(demo_data / row["images"][0]) for row in val_rows]
    for row, preview in zip(val_rows, previews):
        with Image.open(preview["image"]) as image:
            unit = max(image.size) / 1000  # Qwen2-VL writes 0-1000 of the original image
        truth = [to_xyxy(obj["bbox"], row.get("bbox_format", "xyxy")) for obj in row["objects"]]
        assert len(preview["boxes_original"]) == len(truth)
        for got, want in zip(preview["boxes_original"], truth):
            assert got == pytest.approx(want, abs=unit / 2 + 1e-6)
    assert sorted(p.name for p in (tmp_path / "prev").glob("*.png")) == [f"{i:05d}.png" for i in range(3)]
