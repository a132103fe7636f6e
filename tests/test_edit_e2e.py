"""`stage: edit` through the real CLIs: train, resume, 2 processes vs 1, predict, `llamafactory-vision edit`,
eval/edit_eval.py and the pipeline's save/load."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, edit_config, one_torch_thread, read_jsonl, run_cli, write_yaml
from safetensors.torch import load_file

STEPS = 4


def _train_logs(out) -> list[dict]:
    """Training log rows (``step``, ``loss``, ``lm_loss``, ``diffusion_loss``) of a finished run."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [row for row in history if "loss" in row]


def _config(edit_models, edit_data, out, **extra):
    # SGD: Adam turns float-rounding differences in near-zero gradients into full-size steps, which would make the
    # 1- vs 2-process comparison test Adam's sensitivity instead of the data-parallel plumbing.
    defaults = {"max_steps": STEPS, "per_device_train_batch_size": 4, "lr_scheduler_type": "constant", "optim": "sgd",
                "learning_rate": 0.05}  # fmt: skip
    return edit_config(edit_models, edit_data, out, **{**defaults, **extra})


@pytest.fixture(scope="module")
def equal_data(edit_data, tmp_path_factory) -> Path:
    """The synthetic edit set with one expressive text for every row, so every row has as many target tokens.

    The host's multimodal SFT trainer takes the CE as a token mean per process (``model_accepts_loss_kwargs = False``)
    and DDP averages those means: 2 processes equal 1 process on the same global batch only when each process holds
    as many target tokens. The same holds for stock LLaMA-Factory runs."""
    root = tmp_path_factory.mktemp("edit_equal")
    shutil.copytree(edit_data, root, dirs_exist_ok=True)
    for name in ("edit_train.jsonl", "edit_val.jsonl"):
        rows = [{**row, "expressive": "the picture changes as asked"} for row in read_jsonl(root / name)]
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def run_a(edit_models, equal_data, tmp_path_factory):
    """1 process, batch 4, 4 steps, checkpoints at 2 and 4, eval each 2 steps, best = highest eval loss."""
    root = tmp_path_factory.mktemp("edit_a")
    config = _config(
        edit_models, equal_data, root / "out", save_strategy="steps", save_steps=2, eval_dataset="synth_edit_val",
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True, plot_loss=True,
    )  # fmt: skip
    run_cli(["llamafactory-cli", "train", str(write_yaml(root / "a.yaml", config))], cwd=root)
    return root, config


def test_train_logs_both_losses_and_saves_parts(run_a):
    root, _ = run_a
    out = root / "out"
    logs = _train_logs(out)
    assert len(logs) == STEPS
    for row in logs:  # loss = lm_loss + 0.5 * diffusion_loss (the host logs `loss`, we log the parts)
        assert row["loss"] == pytest.approx(row["lm_loss"] + 0.5 * row["diffusion_loss"], abs=2e-3)
    for directory in (out, out / "checkpoint-2", out / "checkpoint-4"):
        for name in ("edit_head/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                     "unet/config.json", "edit_config.json", "adapter_model.safetensors"):  # fmt: skip
            assert (directory / name).is_file(), directory / name
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in adapter) and any("lm_head" in k for k in adapter)  # new [IMG] rows
    assert not any(k.startswith(("edit_", "base_model.model.edit_")) for k in adapter)
    assert (out / "training_diffusion_loss.png").is_file() and (out / "training_lm_loss.png").is_file()


def test_load_best_model_at_end_restores_head_and_unet(run_a):
    out = run_a[0] / "out"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert best.endswith("checkpoint-2"), best  # the eval loss falls, and the highest one is "best" here
    for part in ("edit_head", "unet"):
        final = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        best_part = load_file(str(out / "checkpoint-2" / part / "diffusion_pytorch_model.safetensors"))
        last = load_file(str(out / "checkpoint-4" / part / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(final[k], best_part[k]) for k in final)
        assert any(not torch.equal(final[k], last[k]) for k in final)


def test_resume_continues_exactly(run_a, tmp_path):
    root, config = run_a
    resumed = {**config, "output_dir": tmp_path / "out", "resume_from_checkpoint": root / "out" / "checkpoint-2"}
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "b.yaml", resumed))], cwd=tmp_path)
    full = {row["step"]: row for row in _train_logs(root / "out")}
    again = {row["step"]: row for row in _train_logs(tmp_path / "out")}
    assert sorted(again) == [1, 2, 3, 4]  # 1 and 2 restored from the checkpoint's state
    for step in (3, 4):
        for key in ("loss", "lm_loss", "diffusion_loss"):
            assert again[step][key] == pytest.approx(full[step][key], abs=1e-4), (step, key)


def test_two_processes_match_one(run_a, edit_models, equal_data, tmp_path):
    root, _ = run_a
    config = _config(edit_models, equal_data, tmp_path / "out", per_device_train_batch_size=2)
    config["max_steps"] = 2
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "c.yaml", config))], cwd=tmp_path,
            FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
    one = _train_logs(root / "out")[:2]
    two = _train_logs(tmp_path / "out")
    assert len(two) == 2
    for a, b in zip(one, two):  # the parts are logged rounded to 4 decimals
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5)
        for key in ("lm_loss", "diffusion_loss"):
            assert b[key] == pytest.approx(a[key], abs=2e-4), key


@pytest.fixture(scope="module")
def run_predict(run_a, edit_models, edit_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_predict")
    _, train = run_a
    config = {
        **{k: v for k, v in train.items() if k not in ("do_train", "dataset", "eval_strategy", "eval_steps",
                                                         "load_best_model_at_end", "metric_for_best_model",
                                                         "greater_is_better", "save_strategy", "save_steps")},
        "adapter_name_or_path": run_a[0] / "out", "do_predict": True, "eval_dataset": "synth_edit_val",
        "output_dir": root / "out", "edit_num_inference_steps": 3, "edit_max_new_tokens": 6,
        "edit_clip_model": edit_models["clip"],
    }  # fmt: skip
    run_cli(["llamafactory-cli", "train", str(write_yaml(root / "d.yaml", config))], cwd=root)
    return root / "out", config


def test_predict_writes_images_grid_and_metrics(run_predict, edit_models, edit_data):
    run_predict = run_predict[0]
    rows = read_jsonl(edit_data / "edit_val.jsonl")
    predictions = read_jsonl(run_predict / "generated_predictions.jsonl")
    assert len(predictions) == len(rows)
    assert [p["instruction"] for p in predictions] == [r["instruction"] for r in rows]
    for i in range(len(rows)):
        assert (run_predict / "edited" / f"{i:05d}.png").is_file()
    from PIL import Image

    with Image.open(run_predict / "edit_grid.png") as grid:
        assert grid.size == (3 * 32, len(rows) * 32)
    metrics = json.loads((run_predict / "predict_results.json").read_text())
    assert metrics["predict_n"] == len(rows) and metrics["predict_clip_t_n"] == len(rows)

    # eval/edit_eval.py on the same images gives the same numbers
    result = run_cli([sys.executable, str(REPO / "eval" / "edit_eval.py"), "--outputs", str(run_predict / "edited"),
                      "--dataset", str(edit_data / "edit_val.jsonl"), "--clip_model", str(edit_models["clip"])],
                     cwd=run_predict)  # fmt: skip
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("n", "l1", "l2", "clip_i", "clip_t", "clip_t_n"):
        assert scores[key] == pytest.approx(metrics[f"predict_{key}"], rel=1e-4), key


def test_two_process_predict_equals_one(run_predict, edit_data, tmp_path):
    """2 processes split the eval rows and write the same images, texts, grid and metrics as 1 process."""
    one, config = run_predict
    yaml_path = write_yaml(tmp_path / "e.yaml", {**config, "output_dir": tmp_path / "out"})
    result = run_cli(["llamafactory-cli", "train", str(yaml_path)], cwd=tmp_path, FORCE_TORCHRUN="1",
                     NPROC_PER_NODE="2")  # fmt: skip
    two = tmp_path / "out"
    n = len(read_jsonl(edit_data / "edit_val.jsonl"))
    assert n >= 4  # each process edits rows of both halves (0, 2, ... and 1, 3, ...): the order is reassembled
    # the main process's progress bar counts its share only: the rows were split, not all edited on one process
    bars = re.findall(r"Editing eval images: +\d+%\|[^|\r\n]*\| (\d+)/(\d+) \[", result.stderr)
    assert bars and {total for _, total in bars} == {str(n // 2)}, bars
    assert sorted(p.name for p in (two / "edited").iterdir()) == [f"{i:05d}.png" for i in range(n)]
    from PIL import Image

    for name in [f"edited/{i:05d}.png" for i in range(n)] + ["edit_grid.png"]:
        with Image.open(one / name) as a, Image.open(two / name) as b:
            assert (np.asarray(a) == np.asarray(b)).all(), name
    texts = {path: [{k: v for k, v in row.items() if k != "image"} for row in read_jsonl(path / "generated_predictions.jsonl")]
             for path in (one, two)}  # fmt: skip
    assert texts[two] == texts[one]
    metrics = {path: json.loads((path / "predict_results.json").read_text()) for path in (one, two)}
    scores = [k for k in metrics[one] if not k.endswith(("_runtime", "_per_second"))]
    assert {k: metrics[two][k] for k in scores} == {k: metrics[one][k] for k in scores}


def test_cli_edit_is_seeded_and_matches_the_pipeline(run_a, edit_models, edit_data, tmp_path):
    from llamafactory_vision.editing.pipeline import EditPipeline
    from llamafactory_vision.editing.tokens import img_token_ids
    from PIL import Image

    adapter = run_a[0] / "out"
    source = edit_data / "images" / "edit_00000_0.png"
    args = ["llamafactory-vision", "edit", "--model_name_or_path", str(edit_models["llava"]),
            "--adapter_name_or_path", str(adapter), "--image", str(source), "--instruction", "make the circle blue",
            "--out", str(tmp_path / "cli.png"), "--steps", "3", "--seed", "5"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert "expressive instruction:" in result.stdout

    pipe = EditPipeline.from_training(str(edit_models["llava"]), str(adapter))
    # the trained [IMG] rows come back with the adapter (the host's resize_vocab + modules_to_save)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    ids = img_token_ids(pipe.processor.tokenizer)
    embed_key = next(k for k in saved if k.endswith("embed_tokens.weight"))
    head_key = next(k for k in saved if k.endswith("lm_head.weight"))
    assert torch.equal(pipe.mllm.get_input_embeddings().weight[ids], saved[embed_key][ids])
    assert torch.equal(pipe.mllm.get_output_embeddings().weight[ids], saved[head_key][ids])
    with one_torch_thread():  # as the CLI ran
        with Image.open(source) as image:
            first = pipe(image, "make the circle blue", num_inference_steps=3,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
            again = pipe(image, "make the circle blue", num_inference_steps=3,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
            other = pipe(image, "make the circle blue", num_inference_steps=3,
                         generator=torch.Generator().manual_seed(6))  # fmt: skip
        # save_pretrained / from_pretrained round trip gives the same image
        pipe.save_pretrained(tmp_path / "pipe")
        loaded = type(pipe).from_pretrained(tmp_path / "pipe")
        with Image.open(source) as image:
            reloaded = loaded(image, "make the circle blue", num_inference_steps=3,
                              generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert (np.asarray(first.images[0]) == np.asarray(again.images[0])).all()
    assert (np.asarray(first.images[0]) != np.asarray(other.images[0])).any()
    with Image.open(tmp_path / "cli.png") as cli_image:
        assert (np.asarray(cli_image) == np.asarray(first.images[0])).all()
    assert reloaded.expressive == first.expressive
    assert (np.asarray(reloaded.images[0]) == np.asarray(first.images[0])).all()
