"""MG-LLaVA end to end through the real CLIs on the tiny LLaVA + tiny ConvNeXt: LoRA train with checkpoints, torchrun
2 processes equal to 1 on the same global batch, predict, resume (equal to the uninterrupted run) and export."""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl, run_cli, train_config, write_yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

MG_FILES = ("mg_llava.safetensors", "mg_llava_config.json")


@pytest.fixture(scope="module")
def mg_setup(tmp_path_factory, tiny_models):
    from llamafactory_vision.synth import generate_mg_llava
    from llamafactory_vision.tiny import build_tiny_convnext

    root = tmp_path_factory.mktemp("mg")
    generate_mg_llava(root / "data", n=12, seed=4, val_frac=0.34)
    return {"data": root / "data", "convnext": build_tiny_convnext(root / "convnext"), "model": tiny_models["llava"]}


def _config(setup, out, **extra):
    # Batch 1 x 2 accumulation steps = 2 processes x batch 1 (LLaMA-Factory averages per-batch mean losses for VLMs);
    # plain SGD so that float noise is not amplified into sign(grad) steps as Adam's first step does.
    settings = {"dataset": "synth_mg_train", "mg_hr_vision_tower": setup["convnext"], "mg_hr_image_size": 128,
                "disable_shuffling": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
                "optim": "sgd", "learning_rate": 1.0}
    return train_config(setup["model"], setup["data"], out, "llava_mg", **{**settings, **extra})


def _losses(out):
    return [entry["loss"] for entry in read_jsonl(out / "trainer_log.jsonl") if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mg_setup):
    work = tmp_path_factory.mktemp("mg_train")
    config = _config(mg_setup, work / "out", save_strategy="steps", save_steps=1)
    run_cli(["llamafactory-cli", "train", str(write_yaml(work / "train.yaml", config))], work)
    return work / "out"


def test_lora_run_saves_trained_mg_modules_beside_adapter_and_checkpoints(trained):
    for directory in (trained, trained / "checkpoint-1", trained / "checkpoint-2"):
        assert all((directory / name).is_file() for name in MG_FILES), directory
    first, last = load_file(str(trained / "checkpoint-1" / MG_FILES[0])), load_file(str(trained / MG_FILES[0]))
    assert last["mg_fusion.mg_slow_proj.weight"].abs().sum() > 0  # zero at init: the fusion trained
    assert not torch.equal(first["mg_fusion.mg_slow_proj.weight"], last["mg_fusion.mg_slow_proj.weight"])
    assert not any("mg_" in key for key in load_file(str(trained / "adapter_model.safetensors")))  # no LoRA on ours


def test_two_processes_equal_one(trained, mg_setup, tmp_path):
    config = _config(mg_setup, tmp_path / "ddp", gradient_accumulation_steps=1, ddp_backend="gloo")
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "ddp.yaml", config))], tmp_path,
                     FORCE_TORCHRUN="1", NPROC_PER_NODE="2")  # fmt: skip
    assert "world size: 2" in result.stdout + result.stderr
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(trained), rel=1e-5)
    one, two = load_file(str(trained / MG_FILES[0])), load_file(str(tmp_path / "ddp" / MG_FILES[0]))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_resume_restores_mg_modules(trained, mg_setup, tmp_path):
    config = _config(mg_setup, tmp_path / "resumed", resume_from_checkpoint=trained / "checkpoint-1")
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "resume.yaml", config))], tmp_path)
    full, resumed = load_file(str(trained / MG_FILES[0])), load_file(str(tmp_path / "resumed" / MG_FILES[0]))
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-7)


def test_predict_and_export(trained, mg_setup, tmp_path):
    predict_dir = tmp_path / "predict"
    config = _config(mg_setup, predict_dir, do_train=False, do_predict=True, predict_with_generate=True,
                     adapter_name_or_path=trained, eval_dataset="synth_mg_val", max_new_tokens=6,
                     per_device_eval_batch_size=2)  # fmt: skip
    del config["dataset"]
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "predict.yaml", config))], tmp_path)
    val_rows = read_jsonl(mg_setup["data"] / "mg_val.jsonl")
    predictions = read_jsonl(predict_dir / "generated_predictions.jsonl")
    assert [p["label"] for p in predictions] == [row["conversations"][1]["value"] for row in val_rows]

    export = {"model_name_or_path": str(mg_setup["model"]), "adapter_name_or_path": str(trained),
              "template": "llava_mg", "finetuning_type": "lora", "mg_hr_vision_tower": str(mg_setup["convnext"]),
              "mg_hr_image_size": 128, "export_dir": str(tmp_path / "exported")}  # fmt: skip
    run_cli(["llamafactory-cli", "export", str(write_yaml(tmp_path / "export.yaml", export))], tmp_path)
    for name in MG_FILES:
        assert (tmp_path / "exported" / name).read_bytes() == (trained / name).read_bytes()


def test_stage1_full_run_keeps_model_file_plain_and_llm_frozen(mg_setup, tmp_path):
    out = tmp_path / "stage1"
    config = _config(mg_setup, out, finetuning_type="full", freeze_vision_tower=True, max_steps=1,
                     freeze_multi_modal_projector=False, freeze_language_model=True)  # fmt: skip
    del config["lora_target"]
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "stage1.yaml", config))], tmp_path)
    saved, original = load_file(str(out / "model.safetensors")), load_file(str(mg_setup["model"] / "model.safetensors"))
    assert saved.keys() == original.keys()  # a plain LLaVA checkpoint: the MG modules are in their own file
    assert all((out / name).is_file() for name in MG_FILES)
    language = [k for k in original if "language_model" in k or "lm_head" in k]
    assert language and all(torch.equal(saved[k], original[k]) for k in language)
    projector = [k for k in original if "multi_modal_projector" in k]
    assert any(not torch.equal(saved[k], original[k]) for k in projector)
