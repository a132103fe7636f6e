"""The benchmark harness's own pieces: real-size configs (parameter counts of the published checkpoints), the model
FLOP count, and pulling the result JSON out of a run's log-filled stdout."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from arch import model_config
from bench_grounding import FlopModel
from summarize import extract_last_json

# Total parameters of the published checkpoints (safetensors metadata of the Hugging Face repositories).
PUBLISHED = {"qwen2vl-2b": 2_208_985_600, "qwen2.5vl-3b": 3_754_622_976, "qwen3vl-2b": 2_127_532_032}
FAMILY = {"qwen2vl-2b": "qwen2_vl", "qwen2.5vl-3b": "qwen2_5_vl", "qwen3vl-2b": "qwen3_vl"}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_real_size_configs_have_the_published_parameter_count(arch):
    from llamafactory_vision.tiny.vlm import RECIPES
    from transformers import AutoModelForImageTextToText

    config = model_config(arch, small=False, tokenizer=RECIPES[FAMILY[arch]].tokenizer())
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[arch]


def test_step_flops_by_hand():
    flops = FlopModel(llm_linear=1000, llm_attention=10, vision_linear=100, vision_attention=2)
    lengths, patches = torch.tensor([3, 5]), torch.tensor([4])
    llm_forward = 2 * 1000 * 8 + 4 * 10 * (9 + 25)  # 17,360
    vision_forward = 2 * 100 * 4 + 4 * 2 * 16  # 928
    assert flops.step_flops(lengths, patches, lora=False) == 3 * llm_forward + vision_forward
    assert flops.step_flops(lengths, patches, lora=True) == 2 * llm_forward + vision_forward


def test_extract_last_json_skips_logs_and_earlier_objects():
    text = '[INFO] start\n{"partial": 1}\nlog {not json}\n{\n  "runs": [{"a": 1}],\n  "ok": true\n}\n[INFO] bye\n'
    assert extract_last_json(text) == {"runs": [{"a": 1}], "ok": True}
    with pytest.raises(ValueError):
        extract_last_json("no json here\n")
