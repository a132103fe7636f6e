"""Predict with and without the bbox head, in process, through ``run_grounding_sft`` with only ``generate`` replaced
by fixed answers (so the boxes scored are known): predict's metrics score against the dataset's float boxes (not the
label text rounded to the family's grid), exactly as ``eval/ground_eval.py --images`` does, each row of
generated_predictions.jsonl names its dataset row and image, and one row whose head forward pass fails loses only its
own head boxes. Without the head, 2 processes on an uneven split write the same rows and metrics as 1.

Oracle: torchvision's ``box_iou`` on boxes computed by hand from the dataset file and the fixed answers; the dataset
file for rows and images; the 1-process run for 2 processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GROUND_TEMPLATE, REPO, LogLines, read_jsonl, run_cli, train_config, train_in_process, write_yaml
from llamafactory_vision.grounding.bbox_head import DEFAULT_LAYERS, BBoxHead, BBoxHeadConfig, save_head
from llamafactory_vision.grounding.head_rows import LABEL_BOXES_COLUMN
from PIL import Image
from torchvision.ops import box_iou

FAMILY = "qwen2_vl"
W, H = 200, 100
# Float pixel boxes of the dataset; Qwen2-VL's label text rounds them to 0-1000, which moves each edge by up to
# 0.1 px here: on the small first box (4.32 px square) that changes the IoU by about 0.045.
REC_BOXES = [(20.34, 20.34, 24.66, 24.66), (33.3, 10.7, 150.9, 88.1)]
DETECT_BOXES = [(10.4, 10.6, 50.2, 50.8), (120.6, 40.4, 180.2, 90.6)]
# What the model "generates": row 0 answers its label text exactly (20.34 / 200 * 1000 = 101.7 -> 102, 203.4 -> 203,
# 123.3 -> 123, 246.6 -> 247), so the label text would score it 1.0 and the float box does not.
ANSWERS_1000 = [(102, 203, 123, 247), (180, 120, 760, 870), (52, 106, 251, 508)]
FAILING_ROW = 1  # its answer carries <|quad_start|>, which the failing forward pass below refuses


def answer(ref: str, box: tuple[int, int, int, int], extra: str = "") -> str:
    coords = "({},{}),({},{})".format(*box)
    return f"{extra}<|object_ref_start|>{ref}<|object_ref_end|><|box_start|>{coords}<|box_end|>"


ANSWERS = [
    answer("a", ANSWERS_1000[0]),
    answer("b", ANSWERS_1000[1], extra="<|quad_start|>"),
    answer("c", ANSWERS_1000[2]),
    "The red car.",
]


def tv_iou(pred_1000: tuple[int, ...], label_px: tuple[float, ...]) -> float:
    """torchvision IoU of a 0-1000 answer box (as pixels of the W x H image) with a pixel box."""
    pred = [pred_1000[0] * W / 1000, pred_1000[1] * H / 1000, pred_1000[2] * W / 1000, pred_1000[3] * H / 1000]
    return float(box_iou(torch.tensor([pred], dtype=torch.float64), torch.tensor([label_px], dtype=torch.float64)))


def rounded_1000(box_px: tuple[float, ...]) -> tuple[float, ...]:
    """A pixel box as Qwen2-VL's label text writes it (rounded to 0-1000), back in pixels."""
    return tuple(round(v / s * 1000) * s / 1000 for v, s in zip(box_px, (W, H, W, H)))


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    """A copy of the tiny Qwen2-VL with a random (so row-dependent) bbox head saved beside it, and the dataset."""
    root = tmp_path_factory.mktemp("predict_rows")
    model_dir = root / "model"
    shutil.copytree(tiny_models[FAMILY], model_dir)
    with open(model_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    hidden = config.get("text_config", config).get("hidden_size", config.get("hidden_size"))
    head = BBoxHead(BBoxHeadConfig(hidden, DEFAULT_LAYERS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / hidden**0.5)
    save_head(head, model_dir)

    data = root / "data"
    data.mkdir()
    Image.new("RGB", (W, H), (120, 120, 120)).save(data / "w.png")
    rows = [
        {"images": ["w.png"], "objects": [{"ref": "a", "bbox": list(REC_BOXES[0])}]},
        {"images": ["w.png"], "objects": [{"ref": "b", "bbox": list(REC_BOXES[1])}], "task": "rec"},
        {"images": ["w.png"], "objects": [{"ref": "c", "bbox": list(b)} for b in DETECT_BOXES], "task": "detect"},
        {"images": ["w.png"], "objects": [{"ref": "red car", "bbox": [0, 0, 10, 10]}], "task": "reg"},
    ]
    (data / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    info = {"ground_float": {"file_name": "rows.jsonl", "formatting": "grounding"}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return model_dir, data


@dataclass(frozen=True)
class PredictRun:
    output_dir: Path
    results: dict[str, Any]
    rows: list[dict[str, Any]]
    log: list[str]


def predict(
    model_dir: Path, data: Path, output_dir: Path, fail_row: bool, head: bool = True, untraced: bool = False
) -> PredictRun:
    """``run_grounding_sft`` on the predict config (``bbox_head: head``); ``generate`` answers :data:`ANSWERS` (row i
    of the one batch gets answer i) and, with ``fail_row``, the model's forward pass raises for any batch holding
    :data:`FAILING_ROW`'s answer (as transformers does for image tokens that do not match the image features). With
    ``untraced`` the batches lack the label-box column, as a set tokenized by stock LLaMA-Factory does."""
    from llamafactory.hparams import get_train_args
    from llamafactory_vision.grounding import workflow

    config = train_config(
        model_dir, data, output_dir, GROUND_TEMPLATE[FAMILY], do_train=False, do_predict=True,
        predict_with_generate=True, eval_dataset="ground_float", per_device_eval_batch_size=len(ANSWERS),
        max_new_tokens=64, bbox_head=head, overwrite_cache=True,
    )  # fmt: skip
    del config["dataset"]

    trainer_name = "GroundingTrainer" if head else "GroundingPredictTrainer"

    class FixedAnswers(getattr(workflow, trainer_name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tokenizer, model = self.processing_class, self.model
            answers = [tokenizer.encode(a, add_special_tokens=False) for a in ANSWERS]
            quad = tokenizer.convert_tokens_to_ids("<|quad_start|>")

            def generate(input_ids, **_):
                width = max(len(a) for a in answers)
                new = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
                return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

            forward = model.forward

            def failing_forward(*args, **kwargs):
                if (kwargs["input_ids"] == quad).any():
                    raise ValueError("Image features and image tokens do not match: tokens: 64, features 60")
                return forward(*args, **kwargs)

            model.generate = generate
            if fail_row:
                model.forward = failing_forward

        def prediction_step(self, model, inputs, *args, **kwargs):
            if untraced:
                inputs = {k: v for k, v in inputs.items() if k != LABEL_BOXES_COLUMN}
            return super().prediction_step(model, inputs, *args, **kwargs)

    handler = LogLines(logging.WARNING)
    loggers = [logging.getLogger(f"llamafactory.vision.grounding.{name}") for name in ("trainer", "predict_trainer")]
    for vision_logger in loggers:
        vision_logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(workflow, trainer_name, FixedAnswers)
            args = get_train_args({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
            workflow.run_grounding_sft(*args)
    finally:
        for vision_logger in loggers:
            vision_logger.removeHandler(handler)
    results = json.loads((output_dir / "predict_results.json").read_text())
    return PredictRun(output_dir, results, read_jsonl(output_dir / "generated_predictions.jsonl"), handler.lines)


@pytest.fixture(scope="module")
def runs(predict_setup, tmp_path_factory) -> dict[str, PredictRun]:
    model_dir, data = predict_setup
    root = tmp_path_factory.mktemp("predict_runs")
    return {
        kind: predict(
            model_dir, data, root / kind, kind == "failing", head=kind not in ("no_head", "untraced"),
            untraced=kind == "untraced",
        )
        for kind in ("clean", "failing", "no_head", "untraced")
    }  # fmt: skip


def test_predict_metrics_score_against_the_dataset_float_boxes(runs):
    m = runs["clean"].results
    rec = [tv_iou(ANSWERS_1000[i], REC_BOXES[i]) for i in range(2)]
    detect = tv_iou(ANSWERS_1000[2], DETECT_BOXES[0])  # the one answer box matches the first label box
    # What the rounded label text would give instead: measurably different, so the test can tell them apart.
    rec_text = [tv_iou(ANSWERS_1000[i], rounded_1000(REC_BOXES[i])) for i in range(2)]
    assert "(102,203),(123,247)" in runs["clean"].rows[0]["label"]  # the label text row 0 answers
    assert rec_text[0] == pytest.approx(1.0) and rec[0] < 0.96
    assert abs(sum(rec) - sum(rec_text)) / 2 > 0.02

    assert (m["predict_rows"], m["predict_n"], m["predict_detect_rows"], m["predict_reg_rows"]) == (4, 2, 1, 1)
    assert m["predict_miou"] == pytest.approx(sum(rec) / 2, abs=1e-9)
    assert m["predict_acc@0.5"] == sum(v >= 0.5 for v in rec) / 2
    assert m["predict_acc@0.75"] == sum(v >= 0.75 for v in rec) / 2
    assert m["predict_detect_n"] == 2
    assert m["predict_detect_miou"] == pytest.approx(detect / 2, abs=1e-9)
    assert m["predict_reg_match"] == 1.0 and m["predict_parse_failures"] == 0
    assert m["predict_head_failures"] == 0 and m["predict_head_n"] == 2
    assert all(len(r["predict_boxes_head"]) == (1 if i < 3 else 0) for i, r in enumerate(runs["clean"].rows))


def test_predict_without_the_head_scores_the_float_boxes_and_names_rows(runs, predict_setup):
    """The common case (no head): the same scores as with the head from the same answers, against the float boxes,
    and each row names its dataset row and image."""
    _, data = predict_setup
    m, rows = runs["no_head"].results, runs["no_head"].rows
    rec = [tv_iou(ANSWERS_1000[i], REC_BOXES[i]) for i in range(2)]
    assert rec[0] < 0.96  # the rounded label text would score row 0 exactly 1.0
    assert (m["predict_rows"], m["predict_n"], m["predict_detect_rows"], m["predict_reg_rows"]) == (4, 2, 1, 1)
    assert m["predict_miou"] == pytest.approx(sum(rec) / 2, abs=1e-9)
    assert m["predict_acc@0.5"] == sum(v >= 0.5 for v in rec) / 2
    assert m["predict_acc@0.75"] == sum(v >= 0.75 for v in rec) / 2
    assert m["predict_detect_miou"] == pytest.approx(tv_iou(ANSWERS_1000[2], DETECT_BOXES[0]) / 2, abs=1e-9)
    assert m["predict_reg_match"] == 1.0 and m["predict_parse_failures"] == 0
    assert not any(key.startswith("predict_head_") for key in m), m  # no head, no head keys
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert all(Path(r["image"]) == (data / "w.png") for r in rows)
    assert not any("predict_boxes_head" in r or "bbox_head_failed" in r for r in rows)
    assert [r["predict"] for r in rows] == [r["predict"] for r in runs["clean"].rows]
    assert [r["label"] for r in rows] == [r["label"] for r in runs["clean"].rows]


def test_a_set_without_the_label_box_column_is_scored_on_the_label_text_and_says_so(runs):
    """A generation set tokenized without our columns (stock LLaMA-Factory, an old ``tokenized_path``) can only be
    scored on its label text (boxes rounded to 0-1000): row 0 then scores exactly 1.0, and a warning says why."""
    m, log = runs["untraced"].results, runs["untraced"].log
    rec_text = [tv_iou(ANSWERS_1000[i], rounded_1000(REC_BOXES[i])) for i in range(2)]
    assert m["predict_miou"] == pytest.approx(sum(rec_text) / 2, abs=1e-6)
    assert m["predict_miou"] != pytest.approx(runs["no_head"].results["predict_miou"], abs=1e-3)
    warnings = [line for line in log if LABEL_BOXES_COLUMN in line]
    assert len(warnings) == 1 and "scored on the label text" in warnings[0], log
    assert not any(LABEL_BOXES_COLUMN in line for line in runs["no_head"].log)


@pytest.mark.parametrize("kind", ["clean", "failing", "no_head"])
def test_ground_eval_with_the_dataset_gives_the_same_metrics(kind, runs, predict_setup):
    """Same definitions in predict_results.json and eval/ground_eval.py --images (the shared scoring code), head
    failures included."""
    _, data = predict_setup
    run = runs[kind]
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "ground_eval.py"), "--family", FAMILY,
         "--predictions", str(run.output_dir / "generated_predictions.jsonl"), "--images", str(data / "rows.jsonl")],
        capture_output=True, text=True, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "plugin"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout)
    compared = [k.removeprefix("predict_") for k in run.results if k.removeprefix("predict_") in evaluated]
    expected = {"miou", "acc@0.5", "detect_miou", "pred_out_of_range"}
    if kind != "no_head":
        expected |= {"head_miou", "head_failures"}
    assert expected <= set(compared)
    for key in compared:
        assert evaluated[key] == pytest.approx(run.results[f"predict_{key}"], abs=1e-9), key


def test_one_failing_row_loses_only_its_head_boxes(runs):
    clean, failing = runs["clean"], runs["failing"]
    assert [r["predict"] for r in failing.rows] == [r["predict"] for r in clean.rows]  # the run completed
    assert failing.rows[FAILING_ROW]["predict_boxes_head"] == []
    assert failing.rows[FAILING_ROW]["bbox_head_failed"] is True
    assert not any("bbox_head_failed" in r for r in clean.rows)
    for i, (a, b) in enumerate(zip(clean.rows, failing.rows)):
        if i == FAILING_ROW:
            continue
        assert "bbox_head_failed" not in b and len(a["predict_boxes_head"]) == len(b["predict_boxes_head"])
        for box_a, box_b in zip(a["predict_boxes_head"], b["predict_boxes_head"]):
            # run alone instead of in the batch: the same positions and mask, so the same boxes up to float noise
            torch.testing.assert_close(torch.tensor(box_b["xyxy_model"]), torch.tensor(box_a["xyxy_model"]),
                                       atol=1e-4, rtol=0)  # fmt: skip
            assert max(abs(x - y) for x, y in zip(box_a["xyxy_1000"], box_b["xyxy_1000"])) <= 1
    assert len({json.dumps(r["predict_boxes_head"]) for r in clean.rows[:3]}) == 3  # the head's boxes differ per row

    assert failing.results["predict_head_failures"] == 1
    # the failed row scores 0 in the head keys, as a row whose answer has no box
    assert failing.results["predict_head_n"] == 2 and clean.results["predict_miou"] == failing.results["predict_miou"]
    assert any(f"no head boxes for row {FAILING_ROW} (counting from 0)" in line for line in failing.log), failing.log


# Five rows, distinct images and phrases, 2 per batch: 3 batches, so with 2 processes the sampler repeats a batch to
# give the second process as many as the first.
UNEVEN_SIZES = [(200, 100), (100, 200), (160, 160), (120, 90), (90, 120)]


@pytest.mark.e2e
def test_two_process_predict_without_the_head_equals_one(tiny_models, tmp_path):
    """``llamafactory-cli train`` predict, no head, on the tiny Qwen2-VL (greedy): 2 processes on an uneven split
    write the same generated_predictions.jsonl rows (row, image, prompt, predict, label) and the same metrics as 1
    process (in this process: ``run_exp``, what the CLI calls), and row i is dataset row i (its image and phrase)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, (w, h) in enumerate(UNEVEN_SIZES):
        Image.new("RGB", (w, h), (40 * i, 100, 200 - 30 * i)).save(data / f"img{i}.png")
        box = [w * 0.1 + i * 0.37, h * 0.2 + 0.13, w * 0.6 - 0.21, h * 0.9 - i * 0.11]
        rows.append({"images": [f"img{i}.png"], "objects": [{"ref": f"thing{i}", "bbox": box}], "task": "rec"})
    (data / "uneven.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "dataset_info.json").write_text(
        json.dumps({"uneven": {"file_name": "uneven.jsonl", "formatting": "grounding"}})
    )

    outputs = {}
    for procs in ("1", "2"):
        config = train_config(
            tiny_models[FAMILY], data, tmp_path / procs, GROUND_TEMPLATE[FAMILY], do_train=False, do_predict=True,
            predict_with_generate=True, eval_dataset="uneven", per_device_eval_batch_size=2, max_new_tokens=12,
            do_sample=False, ddp_timeout=120,
        )  # fmt: skip
        del config["dataset"]
        if procs == "2":
            run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / f"predict{procs}.yaml", config))],
                    tmp_path, FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
        else:
            train_in_process(config)
        outputs[procs] = (
            read_jsonl(tmp_path / procs / "generated_predictions.jsonl"),
            json.loads((tmp_path / procs / "predict_results.json").read_text()),
        )
    (rows1, results1), (rows2, results2) = outputs["1"], outputs["2"]
    assert [r["row"] for r in rows1] == list(range(len(rows)))
    assert [Path(r["image"]).name for r in rows1] == [f"img{i}.png" for i in range(len(rows))]
    assert all(f"thing{i}" in r["prompt"] for i, r in enumerate(rows1))
    assert rows2 == rows1
    assert results1["predict_rows"] == len(rows)
    for key, value in results1.items():
        if not any(timing in key for timing in ("runtime", "per_second", "preparation_time")):
            assert results2[key] == value, key
