"""`stage: edit` with `finetuning_type: full`: the whole LLM trained with the edit parts, saved as a full model beside
them, and reloaded by a predict run and the pipeline from that folder alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import edit_config, read_jsonl, run_cli, write_yaml
from safetensors.torch import load_file

FULL = {"finetuning_type": "full", "max_steps": 2, "per_device_train_batch_size": 4, "optim": "sgd",
        "learning_rate": 0.05, "lr_scheduler_type": "constant", "save_strategy": "no"}  # fmt: skip


def _frozen(name: str) -> bool:
    """Weights `finetuning_type: full` keeps: the vision tower and projector (the host's freeze_vision_tower and
    freeze_multi_modal_projector defaults) and the VAE."""
    return any(part in name for part in ("vision_tower", "multi_modal_projector", "edit_vae."))


@pytest.fixture(scope="module")
def full_run(edit_models, edit_data, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("edit_full")
    config = edit_config(edit_models, edit_data, root / "out", **FULL)
    config.pop("lora_target")
    run_cli(["llamafactory-cli", "train", str(write_yaml(root / "full.yaml", config))], cwd=root)
    return root / "out", config


def test_full_finetuning_trains_llm_and_parts_only(edit_models, edit_data, tmp_path):
    """In process: what the optimizer gets (every LLM weight, head, UNet; no VAE, vision tower or projector)."""
    from llamafactory.hparams import get_train_args
    from llamafactory_vision.editing.workflow import build_edit_trainer

    config = edit_config(edit_models, edit_data, tmp_path, **FULL)
    config.pop("lora_target")
    args = get_train_args({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
    trainer = build_edit_trainer(*args[:4])[0]
    named = dict(trainer.model.named_parameters())
    assert not any("lora_" in name for name in named)
    for name, param in named.items():
        assert param.requires_grad != _frozen(name), name
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in named.items() if not _frozen(name)}


def test_full_finetuning_saves_changed_llm_and_reloads_for_predict(full_run, edit_models, edit_data, tmp_path):
    out, config = full_run
    base = load_file(str(edit_models["llava"] / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("edit_") for k in saved)  # the parts live in their own folders
    assert saved.keys() == base.keys()
    changed = {k for k in base if saved[k].shape != base[k].shape or not torch.equal(saved[k], base[k])}
    llm = {k for k in base if "language_model" in k or k.startswith("lm_head")}
    frozen = {k for k in base if _frozen(k)}
    assert llm and frozen and llm.isdisjoint(frozen)
    assert llm <= changed  # every LLM weight moved (embeddings and lm_head resized for [IMG] too)
    assert not changed & frozen
    unet = load_file(str(edit_models["ip2p"] / "unet" / "diffusion_pytorch_model.safetensors"))
    trained_unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(trained_unet[k], unet[k]) for k in unet)

    # predict from the output dir alone (no adapter): the full model, its tokenizer and the parts beside it
    predict = {k: v for k, v in config.items() if k not in ("do_train", "dataset", "max_steps", "save_strategy")}
    predict.update(model_name_or_path=out, do_predict=True, eval_dataset="synth_edit_val", output_dir=tmp_path / "p",
                   edit_num_inference_steps=2, edit_max_new_tokens=4)  # fmt: skip
    run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "predict.yaml", predict))], cwd=tmp_path)
    rows = read_jsonl(edit_data / "edit_val.jsonl")
    assert len(read_jsonl(tmp_path / "p" / "generated_predictions.jsonl")) == len(rows)
    assert all((tmp_path / "p" / "edited" / f"{i:05d}.png").is_file() for i in range(len(rows)))

    # the pipeline built from the folder holds the trained weights, not the base model's
    from llamafactory_vision.editing.pipeline import EditPipeline

    pipe = EditPipeline.from_training(str(out))
    state = pipe.mllm.state_dict()
    key = next(k for k in llm if "layers.0.self_attn.q_proj.weight" in k)
    loaded = next(v for k, v in state.items() if k.endswith(key.split("language_model.")[-1]))
    assert torch.equal(loaded, saved[key]) and not torch.equal(loaded, base[key])
    head = load_file(str(out / "edit_head" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.edit_head.state_dict()[k], v) for k, v in head.items())
