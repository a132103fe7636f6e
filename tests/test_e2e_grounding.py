"""Grounding end to end through the real CLIs, per family, on the tiny models and the demo data:

``llamafactory-cli train`` (LoRA, 2 steps) -> a separate predict run (``do_predict`` + ``predict_with_generate``,
as transformers 5.6 needs) -> ``eval/ground_eval.py`` on its ``generated_predictions.jsonl``; and
``llamafactory-vision preview`` on the same training YAML. A random tiny model predicts no usable box, so the metrics
are checked for their shape, for counting every label box, and for the predict stage and the eval CLI agreeing; the
boxes themselves are checked in the labels written by the predict run and in the preview.

The eval script and the preview command run their ``main`` with the same command line in this process (a process
each costs ~10 s of imports); as processes of their own they are tested in tests/test_ground_eval.py and
tests/test_preview_eval.py.
"""

from __future__ import annotations

import json
import runpy
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GROUND_TEMPLATE, QWEN_FAMILIES, REPO, read_jsonl, run_cli, train_config, write_yaml
from llamafactory_vision.grounding.formats import parse_answer
from PIL import Image
from test_templates import (
    HOST_MAX_PIXELS,
    HOST_MIN_PIXELS,
    RELATIVE_FAMILIES,
    ModelView,
    pixel_xyxy,
    real_model_view,
    written_boxes,
)

pytestmark = pytest.mark.e2e

GROUND_EVAL = REPO / "eval" / "ground_eval.py"
METRIC_KEYS = ("acc@0.5", "acc@0.75", "miou", "n")


@dataclass(frozen=True)
class TrainedRun:
    family: str
    model: Path
    data: Path
    config: Path
    output_dir: Path


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def trained(request, tmp_path_factory, tiny_models, demo_data) -> TrainedRun:
    """One LoRA training run per family, shared by the predict/eval test and the preview test."""
    family = request.param
    work = tmp_path_factory.mktemp(f"e2e_{family}")
    config = train_config(tiny_models[family], demo_data, work / "train", GROUND_TEMPLATE[family])
    config_path = write_yaml(work / "train.yaml", config)
    run_cli(["llamafactory-cli", "train", str(config_path)], work)
    return TrainedRun(family, tiny_models[family], demo_data, config_path, work / "train")


def ground_eval_main(argv: list[str]) -> dict:
    """``eval/ground_eval.py``'s ``main`` on ``argv``, in this process."""
    return runpy.run_path(str(GROUND_EVAL))["main"](argv)


def model_view_oracle(run: TrainedRun):
    """``image path -> ModelView`` from the real processor at the host's default pixel limits (as in the runs)."""
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(run.model), local_files_only=True)
    mm_plugin = TEMPLATES[GROUND_TEMPLATE[run.family]].mm_plugin
    return lambda path: real_model_view(mm_plugin, processor, str(path), HOST_MAX_PIXELS, HOST_MIN_PIXELS)


def expected_boxes(run: TrainedRun, row: dict, view: ModelView) -> list[tuple[float, ...]]:
    """The row's boxes as its family writes them."""
    with Image.open(run.data / row["images"][0]) as image:
        return written_boxes(run.family, row, image.size, view)


def test_train_then_predict_then_ground_eval(trained, tmp_path):
    run = trained
    assert (run.output_dir / "adapter_model.safetensors").is_file()

    # Predict in a run of its own: with transformers 5.6, train + predict_with_generate in one run fails.
    predict_dir = tmp_path / "predict"
    config = train_config(
        run.model, run.data, predict_dir, GROUND_TEMPLATE[run.family],
        do_train=False, do_predict=True, predict_with_generate=True, adapter_name_or_path=run.output_dir,
        eval_dataset="synth_ground_val", max_new_tokens=40, per_device_eval_batch_size=4,
    )  # fmt: skip
    del config["dataset"]
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "predict.yaml", config))], tmp_path)

    val_rows = read_jsonl(run.data / "ground_val.jsonl")
    n_boxes = sum(len(row["objects"]) for row in val_rows)
    results = json.loads((predict_dir / "predict_results.json").read_text())
    for key in METRIC_KEYS:
        assert f"predict_{key}" in results, sorted(results)
    assert results["predict_n"] + results["predict_detect_n"] == n_boxes  # rec rows: one box each; detect: several
    for key in ("acc@0.5", "acc@0.75", "miou"):
        assert 0.0 <= results[f"predict_{key}"] <= 1.0

    # One prediction per val row, in order, naming its row and image; each label is that row's boxes in the family's
    # text.
    predictions = read_jsonl(predict_dir / "generated_predictions.jsonl")
    assert len(predictions) == len(val_rows)
    assert [p["row"] for p in predictions] == list(range(len(val_rows)))
    assert [Path(p["image"]) for p in predictions] == [run.data / row["images"][0] for row in val_rows]
    view = model_view_oracle(run)
    for row, prediction in zip(val_rows, predictions):
        label = parse_answer(prediction["label"])
        assert label.boxes == expected_boxes(run, row, view(run.data / row["images"][0])), prediction["label"]
        assert label.refs == [obj["ref"] for obj in row["objects"]], prediction["label"]
        assert isinstance(prediction["predict"], str)

    # The eval CLI scores the same file the same way the predict stage did: against the dataset's float boxes.
    args = ["--predictions", str(predict_dir / "generated_predictions.jsonl"), "--out", str(tmp_path / "m.json"),
            "--family", run.family, "--images", str(run.data / "ground_val.jsonl")]  # fmt: skip
    if run.family == "qwen2_5_vl":  # model-view pixels: drawing them needs the processor
        args += ["--model", str(run.model), "--visualize", str(tmp_path / "vis")]
    ground_eval_main(args)
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("n", "acc@0.5", "miou", "parse_failures"):
        assert key in metrics, sorted(metrics)
    assert metrics["family"] == run.family
    assert metrics["n"] == results["predict_n"] and metrics["detect_n"] == results["predict_detect_n"]
    assert metrics["label_parse_failures"] == 0
    for key in ("acc@0.5", "acc@0.75", "miou", "parse_failures"):
        assert metrics[key] == pytest.approx(results[f"predict_{key}"], abs=1e-4), key
    if run.family == "qwen2_5_vl":
        assert metrics["visualized"] == len(val_rows) and metrics["visualize_failures"] == 0
        assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [f"{i:05d}.png" for i in range(len(val_rows))]


def test_preview_draws_the_training_targets(trained, tmp_path, capsys):
    from llamafactory_vision.cli import main

    run = trained
    out = tmp_path / "prev"
    assert main(["preview", str(run.config), "--out", str(out), "--n", "4"]) == 0
    assert "preview written to" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]

    train_rows = {str(run.data / row["images"][0]): row for row in read_jsonl(run.data / "ground_train.jsonl")}
    previews = read_jsonl(out / "preview.jsonl")
    assert len(previews) == 4
    view_of = model_view_oracle(run)
    for index, preview in enumerate(previews):
        assert set(preview) >= {"messages", "model_image_size", "boxes_model", "boxes_original"}
        row, view = train_rows[preview["image"]], view_of(preview["image"])
        with Image.open(preview["image"]) as image:
            width, height = image.size
        assert tuple(preview["model_image_size"]) == view.size
        user, assistant = preview["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert f"<|vision_start|><|image_pad|>*{view.image_tokens}<|vision_end|>" in user["content"]
        assert assistant["content"].endswith("<|im_end|>\n")
        with Image.open(out / f"{index:05d}.png") as drawn:
            assert drawn.size == view.size

        # A written coordinate is the true one rounded to the family's unit (1/1000 of the image, or 1 model pixel):
        # decoded back, it is off by at most half a unit.
        unit_x, unit_y = (width / 1000, height / 1000) if run.family in RELATIVE_FAMILIES else (
            width / view.size[0], height / view.size[1])  # fmt: skip
        truth = [pixel_xyxy(obj["bbox"], row.get("bbox_format", "xyxy")) for obj in row["objects"]]
        assert len(preview["boxes_original"]) == len(truth)
        # Qwen2.5-VL pixels are clamped to [0, W'-1] x [0, H'-1] of the model view, as Qwen's converter does.
        bounds = (width, height) if run.family in RELATIVE_FAMILIES else (
            (view.size[0] - 1) * unit_x, (view.size[1] - 1) * unit_y)  # fmt: skip
        for got, want in zip(preview["boxes_original"], truth):
            for i, (g, w) in enumerate(zip(got, want)):
                assert abs(g - min(w, bounds[i % 2])) <= (unit_x if i % 2 == 0 else unit_y) / 2 + 1e-9, (got, want)
        scale = (view.size[0] / width, view.size[1] / height) * 2
        for model_box, original_box in zip(preview["boxes_model"], preview["boxes_original"]):
            assert model_box == pytest.approx([v * s for v, s in zip(original_box, scale)])
        if run.family == "qwen2_5_vl":  # the model-view boxes are exactly the ints the model is trained to write
            want_model = expected_boxes(run, row, view)
            assert len(preview["boxes_model"]) == len(want_model)
            for got, want in zip(preview["boxes_model"], want_model):
                assert got == pytest.approx(want, abs=1e-6)  # a float round trip through [0, 1]
