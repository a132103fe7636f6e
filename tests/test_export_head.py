"""``llamafactory-cli export`` carries the bbox head whenever the checkpoint has one (an export without
``bbox_head: true`` used to drop it silently), and the error for a folder without a head says what is known."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli, write_yaml
from llamafactory_vision.grounding.bbox_head import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    BBoxHead,
    BBoxHeadConfig,
    export_head,
    load_head,
    save_head,
)


def _trained_looking_head(hidden_size: int) -> BBoxHead:
    head = BBoxHead(BBoxHeadConfig(hidden_size, num_layers=2))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.linspace(-1, 1, parameter.numel()).reshape(parameter.shape))
    return head


@pytest.mark.e2e
def test_export_without_the_key_carries_the_head(tiny_models, tmp_path):
    from transformers import AutoConfig

    model = tmp_path / "full_ft"  # a full fine-tune's output: the model with its head beside it
    shutil.copytree(tiny_models["qwen2_vl"], model)
    hidden = AutoConfig.from_pretrained(model).get_text_config().hidden_size
    save_head(_trained_looking_head(hidden), model)
    config = {"model_name_or_path": model, "template": "qwen2_vl_ground", "finetuning_type": "full",
              "export_dir": tmp_path / "exported"}  # fmt: skip (no `bbox_head` key)
    result = run_cli(["llamafactory-cli", "export", str(write_yaml(tmp_path / "export.yaml", config))], tmp_path)
    for name in (HEAD_WEIGHTS, HEAD_CONFIG):
        assert (tmp_path / "exported" / name).read_bytes() == (model / name).read_bytes(), name
    assert f"bbox head exported too: {model} -> {tmp_path / 'exported'}" in result.stdout + result.stderr
    restored = load_head(tmp_path / "exported")
    for key, value in _trained_looking_head(hidden).state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def _infer_args(folder: Path, export_dir: Path, bbox_head: bool):
    model_args = SimpleNamespace(adapter_name_or_path=None, model_name_or_path=str(folder), export_dir=str(export_dir))
    return model_args, None, SimpleNamespace(bbox_head=bbox_head), None


def test_checkpoint_without_head_exports_nothing_or_refuses_when_asked(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    assert export_head(_infer_args(tmp_path / "model", tmp_path / "out", bbox_head=False)) is None
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'model'} has no {HEAD_WEIGHTS}: no bbox head was saved"):
        export_head(_infer_args(tmp_path / "model", tmp_path / "out", bbox_head=True))


def test_missing_head_message_does_not_claim_how_the_checkpoint_was_trained(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_head(tmp_path)
    message = str(error.value)
    assert "was trained without the bbox head" not in message  # it may equally be an export made without the head
    assert "copied or exported without" in message and "training output_dir" in message
