"""``llamafactory-cli export`` of a LoRA `stage: edit` run carries edit_head/, unet/ and edit_config.json, and the
export dir loads as a fully fine-tuned edit model that edits exactly as base + adapter does."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, edit_config, run_cli, write_yaml
from llamafactory_vision.editing.parts import (
    EDIT_CONFIG,
    HEAD_DIR,
    UNET_DIR,
    WEIGHTS,
    EditRecord,
    check_edit_export,
    export_edit,
)
from llamafactory_vision.editing.tokens import IMG_TOKENS
from PIL import Image


@pytest.fixture(scope="module")
def lora_run(edit_models, edit_data, tmp_path_factory):
    """One training step: enough to write an adapter, the edit head, the UNet and edit_config.json."""
    root = tmp_path_factory.mktemp("edit_export")
    config = edit_config(edit_models, edit_data, root / "out", max_steps=1, per_device_train_batch_size=2)
    run_cli(["llamafactory-cli", "train", str(write_yaml(root / "train.yaml", config))], cwd=root)
    return root / "out"


def test_export_carries_the_edit_parts_and_loads_as_a_full_model(lora_run, edit_models, edit_data, tmp_path):
    from llamafactory_vision.editing.pipeline import EditPipeline

    exported = tmp_path / "exported"
    # the demo's export YAML, with this test's paths
    example = yaml.safe_load((REPO / "yaml_examples" / "demo" / "edit_tiny_export.yaml").read_text())
    paths = {"model_name_or_path": edit_models["llava"], "adapter_name_or_path": lora_run, "export_dir": exported}
    assert paths.keys() <= example.keys()
    config = {**example, **paths}
    no_tokens = {k: v for k, v in config.items() if k != "add_special_tokens"}
    refused = run_cli(["llamafactory-cli", "export", str(write_yaml(tmp_path / "bad.yaml", no_tokens))], tmp_path,
                      check=False)  # fmt: skip
    assert refused.returncode != 0
    assert f"{lora_run} is an edit run's checkpoint: export it with its [IMG] tokens" in refused.stderr
    assert not exported.exists()
    result = run_cli(["llamafactory-cli", "export", str(write_yaml(tmp_path / "export.yaml", config))], tmp_path)
    assert f"edit head and UNet exported too: {lora_run} -> {exported}" in result.stdout + result.stderr
    for name in (f"{HEAD_DIR}/{WEIGHTS}", f"{HEAD_DIR}/config.json", f"{UNET_DIR}/{WEIGHTS}", f"{UNET_DIR}/config.json",
                 EDIT_CONFIG):  # fmt: skip
        assert (exported / name).read_bytes() == (lora_run / name).read_bytes(), name

    # Oracle: the base model + adapter (merged by the host's loader) edits the same image the same way.
    merged = EditPipeline.from_training(str(edit_models["llava"]), str(lora_run))
    full = EditPipeline.from_training(str(exported))
    source = edit_data / "images" / "edit_00000_0.png"
    with Image.open(source) as image:
        a = merged(image, "make the circle blue", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
        b = full(image, "make the circle blue", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert a.expressive == b.expressive
    np.testing.assert_allclose(np.asarray(a.images[0], dtype=float), np.asarray(b.images[0], dtype=float), atol=1)


def test_a_checkpoint_without_edit_parts_exports_nothing_and_a_partial_one_fails(tmp_path):
    model_args = SimpleNamespace(
        adapter_name_or_path=None, model_name_or_path=str(tmp_path), export_dir=str(tmp_path / "x"),
        add_special_tokens=None,
    )  # fmt: skip
    args = (model_args,)
    assert export_edit(args) is None
    check_edit_export(args)  # not an edit run: nothing asked
    EditRecord("diffusion", "llava_edit", 32, 2, 7.5, 1.5, 8).save(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{HEAD_DIR}/{WEIGHTS} not found: .* has {EDIT_CONFIG} but not"):
        export_edit(args)
    with pytest.raises(ValueError, match=r"missing: \[IMG0\], .*\[IMG7\]"):
        check_edit_export(args)
    model_args.add_special_tokens = ["<x>", *IMG_TOKENS]
    check_edit_export(args)
