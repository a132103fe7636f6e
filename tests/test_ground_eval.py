"""eval/ground_eval.py end to end, as a subprocess on a hand-made generated_predictions.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "ground_eval.py"
GRAY, GREEN, RED, BLUE = (128, 128, 128), (0, 200, 0), (230, 0, 0), (0, 90, 255)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugin"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def row(predict, label, **extra):
    return {"prompt": "<|im_start|>user\nWhere is it?<|im_end|>", "predict": predict, "label": label, **extra}


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Qwen2-VL predictions (0-1000) covering perfect, shifted, unparseable, head and garbage rows; run once."""
    tmp_path = tmp_path_factory.mktemp("qwen2_run")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (200, 100), GRAY).save(tmp_path / "imgs" / "wide.png")
    Image.new("RGB", (300, 300), GRAY).save(tmp_path / "imgs" / "square.png")
    head = [{"xyxy_1000": [100, 200, 500, 800], "xyxy_model": [0, 0, 1, 1]}]
    predictions = write_jsonl(
        tmp_path / "generated_predictions.jsonl",
        [
            row("the red car(100,200),(500,800)", "the red car(100,200),(500,800)", predict_boxes_head=head),  # 0
            row("(250,0),(750,500)", "(0,0),(500,500)"),  # 1: IoU 1/3
            "this line is not json",  # 2
            {"prompt": "x", "predict": 5, "label": "(0,0),(1,1)"},  # 3: predict not a string
            row("I do not see it", "(100,100),(200,200)"),  # 4: unparseable prediction
            row("(0,0),(1000,1000)", "(0,0),(1000,1000)"),  # 5: its image is missing
            row("(0,0),(10,10)", "(0,0),(10,10)", predict_boxes_head="oops"),  # 6: unreadable head boxes
        ],
    )
    dataset = write_jsonl(
        tmp_path / "ground.jsonl",
        [
            {"images": ["imgs/wide.png"], "objects": [{"ref": "the red car", "bbox": [20, 20, 100, 80]}]},
            {"image": "imgs/square.png", "objects": [{"ref": "x", "bbox": [0, 0, 150, 150]}]},
            {"images": ["imgs/wide.png"]},
            {"images": ["imgs/wide.png"]},
            {"images": [str(tmp_path / "imgs" / "square.png")]},  # absolute path
            {"images": ["imgs/missing.png"]},
            {"images": ["imgs/wide.png"]},
        ],
    )
    vis, out = tmp_path / "vis", tmp_path / "out" / "metrics.json"
    proc = run_eval(
        "--predictions", str(predictions), "--out", str(out), "--visualize", str(vis), "--images", str(dataset)
    )
    assert proc.returncode == 0, proc.stderr
    return {"stdout": json.loads(proc.stdout), "out": out, "vis": vis, "stderr": proc.stderr}


def test_visualize_refuses_predictions_that_do_not_line_up(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100), GRAY).save(tmp_path / "a.png")
    predictions = write_jsonl(tmp_path / "p.jsonl", [row("(0,0),(500,500)", "(0,0),(500,500)")])
    # the dataset's first row is another object: e.g. an invalid row was skipped before predict
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"images": ["a.png"], "objects": [{"ref": "y", "bbox": [50, 0, 200, 100]}]}])
    proc = run_eval("--predictions", str(predictions), "--visualize", str(tmp_path / "v"), "--images", str(dataset),
                    "--family", "qwen2_vl")  # fmt: skip
    assert proc.returncode != 0
    assert "predictions row 0 does not match row 0 of --images" in proc.stderr


def test_cli_metrics(qwen2_run):
    m = qwen2_run["stdout"]
    assert m["family"] == "qwen2_vl"
    assert m["bad_rows"] == 3
    assert m["rows"] == 4 and m["n"] == 4  # rows 0, 1, 4, 5
    assert m["acc@0.5"] == pytest.approx(2 / 4)
    assert m["acc@0.75"] == pytest.approx(2 / 4)
    assert m["miou"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert m["precision@0.5"] == pytest.approx(2 / 3)
    assert m["parse_failures"] == 1 and m["label_parse_failures"] == 0
    assert m["head_n"] == 1 and m["head_acc@0.5"] == pytest.approx(1.0)
    assert json.loads(qwen2_run["out"].read_text()) == m


def test_cli_visualize(qwen2_run):
    m, vis = qwen2_run["stdout"], qwen2_run["vis"]
    assert sorted(p.name for p in vis.iterdir()) == ["00000.png", "00001.png", "00004.png"]
    assert m["visualized"] == 3 and m["visualize_failures"] == 1
    assert "missing.png" in qwen2_run["stderr"]

    # row 1 on a 300x300 image: label (0,0),(500,500) -> (0, 0, 150, 150) green, predicted -> (75, 0, 225, 150) red
    image = Image.open(vis / "00001.png").convert("RGB")
    assert image.size == (300, 300)
    assert image.getpixel((0, 100)) == GREEN
    assert image.getpixel((225, 100)) == RED
    assert image.getpixel((200, 250)) == GRAY
    # row 0 on a 200x100 image: (100,200),(500,800) -> (20, 20, 100, 80); the head box (blue) is drawn last
    image = Image.open(vis / "00000.png").convert("RGB")
    assert image.size == (200, 100)
    assert image.getpixel((20, 50)) == BLUE
    assert image.getpixel((150, 50)) == GRAY


def test_cli_json_answers_need_a_family(tmp_path: Path):
    Image.new("RGB", (64, 64), GRAY).save(tmp_path / "a.png")
    label = json.dumps([{"bbox_2d": [10, 10, 40, 40], "label": "cup"}])
    predictions = write_jsonl(tmp_path / "p.jsonl", [row(f"```json\n{label}\n```", label)])
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"images": ["a.png"]}])

    proc = run_eval("--predictions", str(predictions))
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["family"] == "json" and m["acc@0.5"] == 1.0

    proc = run_eval("--predictions", str(predictions), "--visualize", str(tmp_path / "v"), "--images", str(dataset))
    assert proc.returncode != 0 and "--family" in proc.stderr
    proc = run_eval(
        "--predictions", str(predictions), "--visualize", str(tmp_path / "v"), "--images", str(dataset),
        "--family", "qwen2_5_vl",
    )  # fmt: skip
    assert proc.returncode != 0 and "--model" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_cli_visualize_qwen2_5_vl_model_view_pixels(tmp_path: Path):
    from llamafactory_vision.tiny import build_tiny
    from transformers import AutoProcessor

    model_dir = build_tiny("qwen2_5_vl", tmp_path / "model")
    Image.new("RGB", (640, 480), GRAY).save(tmp_path / "a.png")
    # Oracle for the model view: the real image processor's patch grid (640x480 is below image_max_pixels, so
    # LLaMA-Factory's own resize leaves it alone).
    image_processor = AutoProcessor.from_pretrained(model_dir).image_processor
    _, grid_h, grid_w = image_processor(images=[Image.open(tmp_path / "a.png")])["image_grid_thw"][0].tolist()
    model_w, model_h = grid_w * image_processor.patch_size, grid_h * image_processor.patch_size
    assert (model_w, model_h) != (640, 480)  # the tiny processor's pixel cap shrinks it: the test has teeth
    # the box covering (0.25, 0.25)-(0.5, 0.5) of the image, in model-view pixels
    box = [model_w // 4, model_h // 4, model_w // 2, model_h // 2]
    label = json.dumps([{"bbox_2d": box, "label": "cup"}])
    predictions = write_jsonl(tmp_path / "p.jsonl", [row(label, label)])
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"images": ["a.png"]}])

    vis = tmp_path / "v"
    proc = run_eval(
        "--predictions", str(predictions), "--visualize", str(vis), "--images", str(dataset),
        "--family", "qwen2_5_vl", "--model", str(model_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["visualized"] == 1
    image = Image.open(vis / "00000.png").convert("RGB")
    # (0.25, 0.25, 0.5, 0.5) of 640x480 is (160, 120, 320, 240) in original pixels: the red box (drawn last)
    assert image.getpixel((160, 200)) == RED
    assert image.getpixel((320, 200)) == RED
    assert image.getpixel((240, 240)) == RED
    assert image.getpixel((400, 200)) == GRAY


def test_draw_boxes_copies_and_survives_wild_boxes():
    from llamafactory_vision.grounding.visualize import draw_boxes

    image = Image.new("L", (100, 50), 128)
    boxes = [(10, 10, 40, 40), (90, 45, -1e30, 1e30), (float("nan"), 0, 5, 5), (60, 5, 60, 30)]
    out = draw_boxes(image, boxes, "red", labels=["a", "wild", None, "zero width"], caption_at="bottom")
    assert image.getpixel((10, 20)) == 128 and out.mode == "RGB" and out.size == (100, 50)  # input untouched
    assert out.getpixel((10, 20)) == (255, 0, 0)  # left edge of the first box
    assert out.getpixel((60, 20)) == (255, 0, 0)  # a zero-width box is still drawn as a line
    with pytest.raises(ValueError, match="labels has 1"):
        draw_boxes(image, boxes, "red", labels=["a"])


# ---------------------------------------------------------------------------------------------- hand-written cases


def tv_iou(a, b) -> float:
    """The oracle: torchvision's IoU of two xyxy boxes (never our matching code)."""
    import torch
    from torchvision.ops import box_iou

    return float(box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def px(box_1000, size=(200, 100)):
    """A 0-1000 box -> pixels of an image of ``size``."""
    w, h = size
    return [box_1000[0] * w / 1000, box_1000[1] * h / 1000, box_1000[2] * w / 1000, box_1000[3] * h / 1000]


DATASET_BOX = [20.3, 20.3, 99.7, 79.6]  # floats: the label text rounds them to the 1000 grid
LABEL_1000 = (102, 203, 499, 796)  # round(20.3 / 200 * 1000) = 102, round(20.3 / 100 * 1000) = 203, ...
WRONG_1000 = (600, 0, 700, 100)
DETECT_BOXES = [[10, 10, 50, 50], [120, 40, 180, 90]]


def hand_rows() -> tuple[list, list]:
    """Predictions and the dataset they came from (qwen2_vl text, images of 200x100)."""
    label = "a({},{}),({},{})".format(*LABEL_1000)
    wrong = "x({},{}),({},{})".format(*WRONG_1000)
    detect_label = "c(50,100),(250,500) c(600,400),(900,900)"
    predictions = [
        row(f"{wrong} {label}", label),  # 0 rec: wrong box first -> 0, even though the right one follows
        row(f"{label} {wrong}", label),  # 1 rec: right box first
        row("The red car.", "red car"),  # 2 reg: a normalised text match
        row("c(50,100),(250,500)", detect_label),  # 3 detect: one of two found
    ]
    dataset = [
        {"images": ["w.png"], "objects": [{"ref": "a", "bbox": DATASET_BOX}]},
        {"images": ["w.png"], "objects": [{"ref": "a", "bbox": DATASET_BOX}], "task": "rec"},
        {"images": ["w.png"], "objects": [{"ref": "red car", "bbox": [0, 0, 10, 10]}], "task": "reg"},
        {"images": ["w.png"], "objects": [{"ref": "c", "bbox": b} for b in DETECT_BOXES], "task": "detect"},
    ]
    return predictions, dataset


def test_cli_scores_hand_written_rows_against_dataset_float_boxes(tmp_path: Path):
    Image.new("RGB", (200, 100), GRAY).save(tmp_path / "w.png")
    predictions, dataset = hand_rows()
    pred_file = write_jsonl(tmp_path / "generated_predictions.jsonl", predictions)
    data_file = write_jsonl(tmp_path / "d.jsonl", dataset)
    (tmp_path / "predict_results.json").write_text(json.dumps(
        {"predict_acc@0.5": 0.5, "predict_decoding_do_sample": 0, "predict_decoding_num_beams": 1}))  # fmt: skip

    proc = run_eval("--predictions", str(pred_file), "--images", str(data_file), "--family", "qwen2_vl")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    right = tv_iou(px(LABEL_1000), DATASET_BOX)  # the float box, not the rounded label text (which would give 1.0)
    assert 0.97 < right < 1.0
    assert m["rows"] == 4 and m["n"] == 2
    assert m["acc@0.5"] == 0.5 and m["acc@0.75"] == 0.5  # [wrong, right] scores 0, [right, wrong] scores 1
    assert m["miou"] == pytest.approx((tv_iou(px(WRONG_1000), DATASET_BOX) + right) / 2, abs=1e-12)
    assert m["precision@0.5"] == pytest.approx(1 / 4)
    assert m["reg_rows"] == 1 and m["reg_exact"] == 0.0 and m["reg_match"] == 1.0
    assert m["detect_rows"] == 1 and m["detect_n"] == 2
    assert m["detect_recall@0.5"] == 0.5 and m["detect_precision@0.5"] == 1.0
    assert m["detect_miou"] == pytest.approx(tv_iou(px((50, 100, 250, 500)), DETECT_BOXES[0]) / 2, abs=1e-12)
    assert m["parse_failures"] == 0 and m["label_parse_failures"] == 0 and m["bad_rows"] == 0
    assert m["decoding"] == {"do_sample": 0, "num_beams": 1}
    assert m["coord_space_suspect"] == 0 and "coord_space_warning" not in m

    # Without the dataset the rounded label text is the reference: the right box scores exactly 1.
    proc = run_eval("--predictions", str(pred_file))
    m = json.loads(proc.stdout)
    assert m["miou"] == pytest.approx((0.0 + 1.0) / 2) and m["reg_rows"] == 1 and m["detect_n"] == 2


def test_predict_results_metric_agrees_with_hand_values(tmp_path: Path):
    """ComputeGroundingMetrics (what writes predict_results.json) on token ids of the same hand-written texts."""
    import numpy as np
    from llamafactory_vision.grounding.workflow import ComputeGroundingMetrics, decoding_settings
    from llamafactory_vision.tiny import build_tiny
    from transformers import AutoTokenizer, EvalPrediction

    tokenizer = AutoTokenizer.from_pretrained(build_tiny("qwen2_vl", tmp_path / "m"))
    predictions, _ = hand_rows()

    def ids(texts):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        return np.array([r + [-100] * (width - len(r)) for r in rows])

    metric = ComputeGroundingMetrics(tokenizer, "qwen2_vl", decoding=decoding_settings({"do_sample": False}))
    m = metric(EvalPrediction(ids([p["predict"] for p in predictions]), ids([p["label"] for p in predictions])))
    assert m["n"] == 2 and m["acc@0.5"] == 0.5 and m["miou"] == pytest.approx(0.5)
    assert m["precision@0.5"] == pytest.approx(1 / 4)
    assert (m["reg_rows"], m["reg_match"], m["detect_n"], m["detect_recall@0.5"]) == (1, 1.0, 2, 0.5)
    assert m["detect_miou"] == pytest.approx(tv_iou((50, 100, 250, 500), (50, 100, 250, 500)) / 2)
    assert m["parse_failures"] == 0 and m["decoding_do_sample"] == 0
    assert "rouge-l" in m  # the host's text metrics are kept


def test_cli_warns_about_another_coordinate_space(tmp_path: Path):
    # Qwen3-VL answers in pixels of a large image (past 1000) for 0-1000 labels.
    rows = [row(json.dumps([{"bbox_2d": [1100 + i, 900, 1900, 1400], "label": "x"}]),
                json.dumps([{"bbox_2d": [550, 600, 950, 930], "label": "x"}])) for i in range(6)]  # fmt: skip
    proc = run_eval("--predictions", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--family", "qwen3_vl")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["coord_space_suspect"] == 1 and m["pred_out_of_range"] == 1.0
    assert "outside the coordinate range 0-1000" in m["coord_space_warning"]
    assert "warning:" in proc.stderr and "no decoding settings recorded" in proc.stderr
    assert m["decoding"] is None


def test_evaluation_examples_decode_greedily():
    """The host samples by default (temperature 0.95): IoU would be neither reproducible nor comparable with greedy
    published figures. Every example that generates for evaluation must set do_sample: false."""
    import yaml

    examples = [p for p in sorted((REPO / "yaml_examples").rglob("*.yaml"))
                if (c := yaml.safe_load(p.read_text())).get("predict_with_generate") or c.get("do_predict")]  # fmt: skip
    assert len(examples) >= 5  # the four predict examples and the demo's
    for path in examples:
        assert yaml.safe_load(path.read_text()).get("do_sample") is False, path.name
