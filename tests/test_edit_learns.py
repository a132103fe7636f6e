"""A tiny `stage: edit` run learns its edits: the diffusion loss on its fixed batch falls, and eval/edit_eval.py scores
the trained pipeline's edited images closer to the targets (clip_i up, l1 down) than the untrained pipeline's, on the
same rows, seeds and sampler settings.

Both runs go through ``run_exp``, the function ``llamafactory-cli train`` calls (launcher.launch -> run_exp ->
_training_function -> run_edit_stage), in this process: the same YAML keys, trainer and ``do_predict`` as the CLI
(tests/test_edit_e2e.py runs those through the console script), without paying the ~14 s of imports twice; the
console script on the same YAML wrote bit-identical predict_results.json (checked by hand, 2026-12-01). The
"before" run is the same config with ``learning_rate: 0`` for one step: nothing moves (checked on the saved UNet), so
its predictions are the untrained pipeline's, through the same code.

What makes learning visible in ~60 CPU steps: the pixel VAE (``build_tiny_diffusion(vae="pixel")``, latent = image,
identity by construction) instead of the random one (whose decoded images carry nothing a tiny run could learn),
16 px edits (a 16 x 16 latent), a v-prediction scheduler (an epsilon model this young samples noise: its x0 error is
multiplied by sigma), guidance 1/1 (the conditional prediction alone; the null-condition branches see only the 15%
CFG-dropped samples), and 4 rows trained and edited (memorised).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, edit_config, read_jsonl, train_in_process
from safetensors.torch import load_file

STEPS = 60
ROWS = 4
# Measured (2026-12-01): the untrained pipeline (random UNet) writes saturated noise, clip_i 0.867 and l1 0.375 on
# these rows; after 60 steps 0.992 and 0.125 (the target colour about where the target shape is on 3 of the 4 rows, on
# a noisy background; 100 steps: 0.993 and 0.100). The same run with learning_rate 0 reproduces the "before" figures
# exactly and fails both margins (and the loss check: 0.716 -> 0.722).
CLIP_I_GAIN = 0.05
L1_RATIO = 0.6


def _run(edit_models, pixel, data, out: Path, **extra) -> Path:
    config = edit_config(
        edit_models, data, out, diffusion_model_name_or_path=pixel, edit_resolution=16, do_predict=True,
        eval_dataset="synth_edit_train", per_device_train_batch_size=ROWS, lr_scheduler_type="constant",
        logging_steps=1, disable_gradient_checkpointing=True, edit_num_inference_steps=10, edit_text_guidance=1.0,
        edit_image_guidance=1.0, edit_max_new_tokens=4, edit_clip_model=edit_models["clip"], **extra,
    )  # fmt: skip
    train_in_process(config)  # one thread, as the CLI runs; the budget of this file is one core
    return out


def _edit_eval(out: Path, data: Path, clip: Path) -> dict:
    """eval/edit_eval.py (its ``main``, in this process) on a run's edited images."""
    spec = importlib.util.spec_from_file_location("edit_eval", REPO / "eval" / "edit_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = out / "edit_eval.json"
    module.main(["--outputs", str(out / "edited"), "--dataset", str(data / "edit_train.jsonl"),
                 "--clip_model", str(clip), "--out", str(target)])  # fmt: skip
    return json.loads(target.read_text())


def _diffusion_losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [row["diffusion_loss"] for row in history if "diffusion_loss" in row and "loss" in row]


@pytest.fixture(scope="module")
def runs(edit_models, tmp_path_factory):
    from llamafactory_vision.synth import generate_edit
    from llamafactory_vision.tiny import build_tiny_diffusion

    root = tmp_path_factory.mktemp("edit_learns")
    pixel = build_tiny_diffusion(root / "pixel", seed=0, resolution=16, vae="pixel", prediction_type="v_prediction")
    data = root / "data"
    generate_edit(data, n=ROWS, seed=0, val_frac=0.0)
    before = _run(edit_models, pixel, data, root / "before", max_steps=1, learning_rate=0.0)
    after = _run(edit_models, pixel, data, root / "after", max_steps=STEPS, learning_rate=5e-3)
    return {"pixel": pixel, "data": data, "before": before, "after": after}


def test_before_run_is_the_untrained_pipeline(runs):
    untrained = load_file(str(runs["pixel"] / "unet" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(runs["before"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == untrained.keys() and all(torch.equal(saved[k], untrained[k]) for k in saved)
    # same init, same per-row draws: step 1 of the training run saw exactly the before run's loss
    assert _diffusion_losses(runs["after"])[0] == _diffusion_losses(runs["before"])[0]


def test_diffusion_loss_falls_on_the_fixed_batch(runs):
    """Every step trains on the same batch (all 4 rows); the noise and timesteps are drawn per step, so the figures
    compared are means over the first and last 10 steps."""
    losses = _diffusion_losses(runs["after"])
    assert len(losses) == STEPS
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"diffusion loss, mean of steps 1-10 -> {STEPS - 9}-{STEPS}: {start:.4f} -> {end:.4f}")
    assert end < 0.5 * start, losses


def test_edit_eval_improves_over_the_untrained_pipeline(runs, edit_models):
    rows = read_jsonl(runs["data"] / "edit_train.jsonl")
    for run in ("before", "after"):  # the same rows edited, with the same generator seeds (seed + row)
        lines = read_jsonl(runs[run] / "generated_predictions.jsonl")
        assert [line["instruction"] for line in lines] == [row["instruction"] for row in rows]
    before = _edit_eval(runs["before"], runs["data"], edit_models["clip"])
    after = _edit_eval(runs["after"], runs["data"], edit_models["clip"])
    print(f"edit_eval before -> after: clip_i {before['clip_i']:.4f} -> {after['clip_i']:.4f}, "
          f"l1 {before['l1']:.4f} -> {after['l1']:.4f}, l2 {before['l2']:.4f} -> {after['l2']:.4f}")  # fmt: skip
    assert before["n"] == after["n"] == ROWS
    assert after["clip_i"] > before["clip_i"] + CLIP_I_GAIN, (before, after)
    assert after["l1"] < L1_RATIO * before["l1"], (before, after)
    # the evaluator and the run's own predict metrics agree (one scorer, two entry points)
    predict = json.loads((runs["after"] / "predict_results.json").read_text())
    assert predict["predict_clip_i"] == pytest.approx(after["clip_i"], rel=1e-5)
    assert predict["predict_l1"] == pytest.approx(after["l1"], rel=1e-5)
