"""The offline grounding demo behind ``make demo``.

Every step is what a user would run by hand; the YAMLs are in ``yaml_examples/demo/`` and use paths under
``out/demo`` (overridden on the command line when ``--out`` differs):

1. build a tiny random Qwen2-VL (``llamafactory_vision.tiny``) and a synthetic grounding set (``synth``);
2. ``llamafactory-vision preview`` the training data (target boxes drawn on the image the model sees);
3. ``llamafactory-cli train`` a predict run before training, the training run, a predict run after;
4. ``eval/ground_eval.py`` on both predictions (with pictures), then print the before/after table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llamafactory_vision.demo_common import DEMO_YAMLS, cli_train, prepare_out, run_eval, write_resolved
from llamafactory_vision.grounding.bbox_head import BBoxHead, BBoxHeadConfig, save_head
from llamafactory_vision.grounding.preview import preview
from llamafactory_vision.synth import generate_grounding
from llamafactory_vision.tiny import build_tiny

DEFAULT_OUT = "out/demo"

# Sizes chosen so that training fits in a few minutes on 2 CPU cores (see README for the measured figures).
MODEL_SIZE = {
    "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "vision_hidden_size": 64, "vision_depth": 2,
}  # fmt: skip
DEMO_ROWS = 4000  # 90% train, 10% val
SEED = 0


def _overrides(out: Path, **extra: Any) -> dict[str, Any]:
    """Overrides for ``llamafactory-cli train demo.yaml``: point the YAML at ``out``."""
    return {"model_name_or_path": out / "models" / "qwen2_vl", "dataset_dir": out / "data", **extra}


def build_model(out: Path) -> Path:
    """The tiny Qwen2-VL in ``out/models/qwen2_vl`` with an untrained head beside it (so "before" scores the head too);
    the same ``out`` contents on every call.

    Training starts from this head (``attach_head`` loads a head found beside the model), so its random hidden layers
    are drawn from ``SEED`` here: ``build_tiny`` seeds only its own forked RNG, and an unseeded draw made every run
    train from another head (text Acc@0.5 0.685 vs 0.848 on two runs of the same code).
    """
    model_dir = build_tiny("qwen2_vl", out / "models" / "qwen2_vl", seed=SEED, **MODEL_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        head = BBoxHead(BBoxHeadConfig(hidden_size=MODEL_SIZE["hidden_size"]))
    save_head(head, model_dir)
    return model_dir


def _evaluate(predictions_dir: Path, data_dir: Path, model_dir: Path, vis_dir: Path) -> dict:
    args = [
        "--predictions", str(predictions_dir / "generated_predictions.jsonl"), "--family", "qwen2_vl",
        "--visualize", str(vis_dir), "--images", str(data_dir / "ground_val.jsonl"),
        "--dataset-dir", str(data_dir), "--model", str(model_dir),
    ]  # fmt: skip
    return run_eval("ground_eval.py", args, predictions_dir / "ground_metrics.json", predictions_dir / "ground_eval.log")


def run_demo(out_dir: str = DEFAULT_OUT, quick: bool = False) -> int:
    start = time.time()
    out, logs = prepare_out(out_dir)

    print("1/5 building the tiny Qwen2-VL and the synthetic grounding set", flush=True)
    model_dir = build_model(out)
    data_dir = out / "data"
    generate_grounding(data_dir, n=100 if quick else DEMO_ROWS, seed=SEED, val_frac=0.1, preset="demo")

    print("2/5 preview: target boxes on the images as the model sees them", flush=True)
    train_yaml = DEMO_YAMLS / "qwen2vl_ground_train.yaml"
    preview_dir = out / "preview"
    train_extra = {"output_dir": out / "train"}
    if quick:
        train_extra["max_steps"] = 5
    # preview reads the same YAML as training; overrides are applied by writing a resolved copy
    resolved = out / "qwen2vl_ground_train.resolved.yaml"
    write_resolved(train_yaml, resolved, _overrides(out, **train_extra))
    preview(str(resolved), str(preview_dir), n=8)

    predict_yaml = DEMO_YAMLS / "qwen2vl_ground_predict.yaml"
    print("3/5 predict before training", flush=True)
    before_dir = out / "predict_before"
    cli_train(predict_yaml, _overrides(out, output_dir=before_dir), logs / "predict_before.log")

    print("4/5 training through llamafactory-cli", flush=True)
    t0 = time.time()
    cli_train(resolved, {}, logs / "train.log")
    train_seconds = time.time() - t0

    print("5/5 predict after training and evaluate", flush=True)
    after_dir = out / "predict_after"
    trained = out / "train"
    cli_train(predict_yaml, _overrides(out, output_dir=after_dir, model_name_or_path=trained), logs / "predict_after.log")

    before = _evaluate(before_dir, data_dir, model_dir, out / "vis_before")
    after = _evaluate(after_dir, data_dir, trained, out / "vis_after")
    _report(before, after, train_seconds, time.time() - start, out)
    return 0


def _report(before: dict, after: dict, train_seconds: float, total_seconds: float, out: Path) -> None:
    rows = [
        ("text acc@0.5", "acc@0.5"), ("text acc@0.75", "acc@0.75"), ("text mIoU", "miou"),
        ("head acc@0.5", "head_acc@0.5"), ("head acc@0.75", "head_acc@0.75"), ("head mIoU", "head_miou"),
    ]  # fmt: skip
    print("\n== grounding demo: tiny Qwen2-VL on the synthetic val split ==")
    print(f"{'metric':<16}{'before':>10}{'after':>10}")
    def cell(metrics: dict, key: str) -> str:
        return f"{metrics[key]:>10.3f}" if key in metrics else f"{'-':>10}"  # no head boxes in that run

    for name, key in rows:
        print(f"{name:<16}{cell(before, key)}{cell(after, key)}")
    print(f"{'parse failures':<16}{before['parse_failures']:>10d}{after['parse_failures']:>10d}")
    print(f"label boxes: {after['n']}   training: {train_seconds:.0f} s   whole demo: {total_seconds:.0f} s")
    print(f"pictures: {out / 'preview'} (targets), {out / 'vis_before'} and {out / 'vis_after'} "
          "(green = label, red = text prediction, blue = bbox head)")  # fmt: skip
    print(f"metrics: {out / 'predict_after' / 'ground_metrics.json'}; LLaMA-Factory's own: "
          f"{out / 'predict_after' / 'predict_results.json'}")  # fmt: skip
