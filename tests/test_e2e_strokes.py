"""Draw&Guess end to end through the real CLIs on the tiny LLaVA: train (1 process and torchrun 2 processes on the
same global batch: equal losses), predict in its own run, then eval/guess_eval.py with a gallery."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import REPO, read_jsonl, run_cli, train_config, write_yaml

pytestmark = pytest.mark.e2e

GUESS_EVAL = REPO / "eval" / "guess_eval.py"
CORNERS = re.compile(r"\((\d\.\d{3}), (\d\.\d{3})\).*\((\d\.\d{3}), (\d\.\d{3})\)", re.DOTALL)


@pytest.fixture(scope="module")
def stroke_data(tmp_path_factory):
    from llamafactory_vision.synth import generate_stroke_guess

    root = tmp_path_factory.mktemp("strokes")
    generate_stroke_guess(root, n=12, seed=3, val_frac=0.34)
    return root


def _config(tiny_models, data, out, **extra):
    # Plain SGD: Adam's first step is sign(grad), which turns float noise in near-zero gradients into whole
    # learning-rate steps, so 1- and 2-process runs could not be compared closely after an update.
    return train_config(tiny_models["llava"], data, out, "llava_strokes", dataset="synth_strokes_train",
                        stroke_cache_dir=data / "cache", disable_shuffling=True, optim="sgd", learning_rate=1.0,
                        **extra)  # fmt: skip


def _losses(out):
    return [entry["loss"] for entry in read_jsonl(out / "trainer_log.jsonl") if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, stroke_data):
    work = tmp_path_factory.mktemp("strokes_train")
    # Batch 1 x 2 accumulation steps: the same global batch, reduced the same way, as 2 processes x batch 1 (for
    # VLMs LLaMA-Factory averages per-batch mean losses: model_accepts_loss_kwargs = False).
    config = _config(tiny_models, stroke_data, work / "out", per_device_train_batch_size=1,
                     gradient_accumulation_steps=2)  # fmt: skip
    run_cli(["llamafactory-cli", "train", str(write_yaml(work / "train.yaml", config))], work)
    return work / "out"


def test_two_processes_equal_one(trained, tiny_models, stroke_data, tmp_path):
    config = _config(tiny_models, stroke_data, tmp_path / "ddp", per_device_train_batch_size=1, ddp_backend="gloo")
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "ddp.yaml", config))], tmp_path,
                     FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    one, two = _losses(trained), _losses(tmp_path / "ddp")
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-5)


def test_predict_then_guess_eval(trained, tiny_models, stroke_data, tmp_path):
    predict_dir = tmp_path / "predict"
    config = _config(tiny_models, stroke_data, predict_dir, do_train=False, do_predict=True,
                     predict_with_generate=True, adapter_name_or_path=trained, eval_dataset="synth_strokes_val",
                     max_new_tokens=8, per_device_eval_batch_size=4)  # fmt: skip
    del config["dataset"]
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "predict.yaml", config))], tmp_path)
    val_rows = read_jsonl(stroke_data / "strokes_val.jsonl")
    predictions = read_jsonl(predict_dir / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [row["answer"] for row in val_rows]
    for prediction in predictions:
        x1, y1, x2, y2 = map(float, CORNERS.search(prediction["prompt"]).groups())
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1

    args = [sys.executable, str(GUESS_EVAL), "--predictions", str(predict_dir / "generated_predictions.jsonl"),
            "--out", "m.json", "--gallery", "g.png", "--data", str(stroke_data / "strokes_val.jsonl"),
            "--stroke-cache-dir", str(stroke_data / "cache")]  # fmt: skip
    run_cli(args, tmp_path)
    metrics = json.loads((tmp_path / "m.json").read_text())
    from llamafactory_vision.strokes.metrics import guess_scores

    expected = guess_scores((p["predict"], p["label"]) for p in predictions)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["n"] == len(val_rows) and metrics["bad_rows"] == 0
    assert (tmp_path / "g.png").is_file()
