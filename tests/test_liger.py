"""`enable_liger_kernel` with grounding templates: accepted where the host applies Liger (Qwen2-VL, Qwen2.5-VL, with
or without the bbox head), refused at start-up where it would silently not apply (Qwen3-VL) or silently change the
loss (DFT/EAFT). liger-kernel needs a GPU (Triton) and is not installed here, so the host's own dependency check
would stop the parse first: each case parses without the key, sets it, and runs our start-up check on the result."""

from __future__ import annotations

import pytest
from conftest import GROUND_TEMPLATE, STOCK_TEMPLATE


def _validate(model_dir, data_dir, out, template: str, **extra) -> None:
    from llamafactory.hparams import get_train_args
    from llamafactory_vision.hparams import validate_parsed_args

    parsed = get_train_args(
        {
            "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "synth_ground_train", "dataset_dir": str(data_dir), "template": template,
            "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none", **extra,
        }
    )  # fmt: skip
    parsed[0].enable_liger_kernel = True
    validate_parsed_args(parsed)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("head", [False, True])
def test_liger_is_accepted_where_the_host_applies_it(family, head, tiny_models, demo_data, tmp_path):
    _validate(tiny_models[family], demo_data, tmp_path, GROUND_TEMPLATE[family], bbox_head=head)


def test_liger_is_refused_for_qwen3_vl(tiny_models, demo_data, tmp_path):
    with pytest.raises(ValueError, match="has no effect on 'qwen3_vl' models in LLaMA-Factory 0.9.5"):
        _validate(tiny_models["qwen3_vl"], demo_data, tmp_path, GROUND_TEMPLATE["qwen3_vl"])
    # a stock template keeps the host's behaviour (a warning, no Liger): our check is for grounding templates only
    _validate(tiny_models["qwen3_vl"], demo_data, tmp_path, STOCK_TEMPLATE["qwen3_vl"])


@pytest.mark.parametrize(("key", "loss"), [("use_dft_loss", "DFT"), ("use_eaft_loss", "EAFT")])
def test_liger_is_refused_with_a_loss_that_needs_logits(key, loss, tiny_models, demo_data, tmp_path):
    with pytest.raises(ValueError, match=f"does not support `{key}: true`.*host's {loss} loss"):
        _validate(tiny_models["qwen2_vl"], demo_data, tmp_path, GROUND_TEMPLATE["qwen2_vl"], **{key: True})


def test_dft_and_eaft_fall_back_to_the_plain_loss_without_logits():
    """The host behaviour the refusal guards against (its loss functions given a forward output without logits, as
    Liger's fused cross-entropy returns in training)."""
    import torch
    from llamafactory.train.trainer_utils import dft_loss_func, eaft_loss_func

    outputs = {"loss": torch.tensor(1.25), "logits": None}
    labels = torch.tensor([[1, 2, 3]])
    assert dft_loss_func(outputs, labels).item() == 1.25
    assert eaft_loss_func(outputs, labels, None, 1.0).item() == 1.25
