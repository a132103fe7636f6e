"""The offline editing demo behind ``llamafactory-vision demo --task edit``.

Every step is what a user would run by hand; the YAMLs are ``yaml_examples/demo/edit_tiny*.yaml`` with paths under
``out/demo_edit`` (overridden on the command line when ``--out`` differs):

1. build a tiny random LLaVA-1.5, a tiny 8-channel UNet with the pixel VAE (latent = image: the edits show in
   pixels) and a v-prediction scheduler, a tiny CLIP (``llamafactory_vision.tiny``) and a synthetic edit set (``synth edit``); save an untrained edit head beside the base model, so that "before" runs the
   same pipeline with untrained parts;
2. ``llamafactory-cli train`` a predict run before training, the training run (``stage: edit``), a predict run after;
3. ``eval/edit_eval.py`` on both sets of edited images, then print the before/after table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from llamafactory_vision.demo_common import DEMO_YAMLS, cli_train, prepare_out, run_eval, write_resolved
from llamafactory_vision.editing.diffusion import load_diffusion
from llamafactory_vision.editing.edit_head import EditHead
from llamafactory_vision.editing.parts import HEAD_DIR, UNET_DIR, EditRecord
from llamafactory_vision.synth import generate_edit
from llamafactory_vision.tiny import build_tiny, build_tiny_clip, build_tiny_diffusion

DEFAULT_OUT = "out/demo_edit"
DEMO_ROWS = 600  # 90% train, 10% val
SEED = 0
TRAIN_YAML = "edit_tiny.yaml"
PREDICT_YAML = "edit_tiny_predict.yaml"


def _untrained_parts(model_dir: Path, diffusion_dir: Path, train_yaml: Path) -> None:
    """An untrained edit head (sized as in the training YAML) and the folder's UNet beside the base model."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(train_yaml)
    parts = load_diffusion(diffusion_dir)
    # Seeded as the training run seeds its own fresh head, so the "before" figures repeat from run to run.
    torch.manual_seed(config.get("seed", 42))
    head = EditHead(
        llm_hidden_size=json.loads((model_dir / "config.json").read_text())["text_config"]["hidden_size"],
        cross_attention_dim=parts.unet.config.cross_attention_dim,
        d_model=config.edit_head_width,
        num_encoder_layers=config.edit_head_layers,
        num_decoder_layers=config.edit_head_layers,
        dim_feedforward=config.edit_head_ffn,
    )
    head.save_pretrained(model_dir / HEAD_DIR)
    parts.unet.save_pretrained(model_dir / UNET_DIR)
    EditRecord(str(diffusion_dir), "llava_edit", config.edit_resolution, config.edit_num_inference_steps, 7.5, 1.5,
               24).save(model_dir)  # fmt: skip


def _evaluate(predict_dir: Path, data_dir: Path, clip_dir: Path) -> dict:
    args = ["--outputs", str(predict_dir / "edited"), "--dataset", str(data_dir / "edit_val.jsonl"),
            "--clip_model", str(clip_dir)]  # fmt: skip
    return run_eval("edit_eval.py", args, predict_dir / "edit_metrics.json", predict_dir / "edit_eval.log")


def run_edit_demo(out_dir: str = DEFAULT_OUT, quick: bool = False) -> int:
    start = time.time()
    out, logs = prepare_out(out_dir)
    models = out / "models"

    print("1/4 building the tiny LLaVA-1.5, UNet/VAE, CLIP and the synthetic edit set", flush=True)
    llava = build_tiny("llava", models / "llava", seed=SEED)
    for name in (HEAD_DIR, UNET_DIR):  # a rerun starts from untrained parts again
        shutil.rmtree(llava / name, ignore_errors=True)
    ip2p = build_tiny_diffusion(models / "ip2p", seed=SEED, resolution=16, vae="pixel", prediction_type="v_prediction")
    clip = build_tiny_clip(models / "clip", seed=SEED)
    data = out / "data"
    generate_edit(data, n=60 if quick else DEMO_ROWS, seed=SEED, val_frac=0.1)
    common = {"model_name_or_path": llava, "dataset_dir": data, "diffusion_model_name_or_path": ip2p}
    train_yaml = out / TRAIN_YAML
    train_extra = {**common, "output_dir": out / "train"}
    if quick:
        train_extra["max_steps"] = 5
    write_resolved(DEMO_YAMLS / TRAIN_YAML, train_yaml, train_extra)
    _untrained_parts(llava, ip2p, train_yaml)

    predict = {**common, "edit_clip_model": clip}
    if quick:
        predict["edit_num_inference_steps"] = 3
    print("2/4 edit the val images before training", flush=True)
    before_dir = out / "predict_before"
    cli_train(DEMO_YAMLS / PREDICT_YAML, {**predict, "output_dir": before_dir}, logs / "predict_before.log")

    print("3/4 training through llamafactory-cli (stage: edit)", flush=True)
    t0 = time.time()
    cli_train(train_yaml, {}, logs / "train.log")
    train_seconds = time.time() - t0

    print("4/4 edit after training and evaluate", flush=True)
    after_dir = out / "predict_after"
    cli_train(DEMO_YAMLS / PREDICT_YAML, {**predict, "output_dir": after_dir, "adapter_name_or_path": out / "train"},
              logs / "predict_after.log")  # fmt: skip
    before, after = _evaluate(before_dir, data, clip), _evaluate(after_dir, data, clip)
    _report(before, after, out, train_seconds, time.time() - start)
    return 0


def _report(before: dict, after: dict, out: Path, train_seconds: float, total_seconds: float) -> None:
    history = json.loads((out / "train" / "trainer_state.json").read_text())["log_history"]
    steps = [row for row in history if "diffusion_loss" in row and "loss" in row]
    print("\n== editing demo: tiny LLaVA-1.5 + tiny UNet on the synthetic val split ==")
    print(f"{'metric':<12}{'before':>10}{'after':>10}")
    for key in ("l1", "l2", "clip_i", "clip_t"):
        print(f"{key:<12}{before[key]:>10.4f}{after[key]:>10.4f}")
    if steps:
        first, last = steps[0], steps[-1]
        for key in ("lm_loss", "diffusion_loss"):
            print(f"{key:<12}{first[key]:>10.4f}{last[key]:>10.4f}   (training log, step {first['step']} -> "
                  f"{last['step']})")  # fmt: skip
    print(f"rows: {after['n']}   training: {train_seconds:.0f} s   whole demo: {total_seconds:.0f} s")
    print(f"pictures (source | edited | target): {out / 'predict_before' / 'edit_grid.png'}, "
          f"{out / 'predict_after' / 'edit_grid.png'}; loss curves: {out / 'train'}/training_*.png")  # fmt: skip
