"""ATen ops of one workload-(a) training step at Qwen2-VL-2B's real depths (28 LLM layers, 32 vision blocks) and the
--small widths, batch 8, on a CPU: how many ops a step dispatches depends on the depth and the code path, not on the
width, so this is the host's share of an H200 step. Usage, from the repository root::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/results/2026-12-01-epyc-step-split/real_depth_ops.py lora out.json

A CPU step has no autocast (bf16 on the GPU adds its casts) and runs AdamW's foreach path (the GPU's is fused).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from llamafactory_vision import _bootstrap

_bootstrap.install()
torch.set_num_threads(1)
import arch
import bench_grounding as bg

arch._SMALL_TEXT["num_hidden_layers"] = arch.ARCHS["qwen2vl-2b"]["text"]["num_hidden_layers"]
arch._SMALL_VISION["qwen2_vl"]["depth"] = arch.ARCHS["qwen2vl-2b"]["vision"]["depth"]
mode, out = sys.argv[1], Path(sys.argv[2])
result = {"mode": mode, "batch_size": 8, "layers": 28, "vision_blocks": 32, "variants": {}}
with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    bg.write_model("qwen2vl-2b", work / "model", True, "cpu", torch.float32)
    bg.write_rows(work / "data", n=64, size_classes=("normal",))
    bg.write_stock_twin(work / "data", "qwen2_vl", work / "model")
    for variant in bg.VARIANTS:
        runner = bg.build_variant(work / "model", work / "data", work, "qwen2_vl", variant, mode, device="cpu",
                                  batch_size=8)  # fmt: skip
        runner.step(0)  # the first step builds the optimizer state
        with bg.OpCounter() as counter:
            timing = runner.step(1)
        result["variants"][variant] = {
            "ops_per_step": counter.ops, "kernel_ops_per_step": counter.kernels, "tokens": timing.tokens,
            "collate_s": round(timing.collate_seconds, 4),
        }  # fmt: skip
        print(variant, result["variants"][variant], flush=True)
out.write_text(json.dumps(result, indent=1) + "\n")
