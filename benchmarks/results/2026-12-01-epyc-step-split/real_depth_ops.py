"""ATen ops of one workload-(a) training step at Qwen2-VL-2B's real depths (28 LLM layers, 32 vision blocks) and the
--small widths, batch 8, on a CPU: how many ops a step dispatches depends on the depth and the code path, not on the
width, so this is the host's share of an H200 step. Usage, from the repository root (MODE: lora or full)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/results/2026-12-01-epyc-step-split/real_depth_ops.py MODE out.json

``variants``: the whole step of each variant (AdamW fused, as on the GPU; no autocast). ``stock_forward_by_part``:
the stock model's forward alone under bf16 autocast (as on the GPU), its ops split by the parts Liger's
``apply_liger_kernel_to_qwen2_vl`` replaces: RMSNorm, the MLP (its SwiGLU and its linear layers), the M-RoPE
application, the LM head and the loss; LayerNorm (vision) apart; everything else is ``other``.
"""

import collections
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
from transformers.models.qwen2_vl import modeling_qwen2_vl

arch._SMALL_TEXT["num_hidden_layers"] = arch.ARCHS["qwen2vl-2b"]["text"]["num_hidden_layers"]
arch._SMALL_VISION["qwen2_vl"]["depth"] = arch.ARCHS["qwen2vl-2b"]["vision"]["depth"]


class OpsByPart(bg.OpCounter):
    """OpCounter that also files each op under the innermost tagged part running it."""

    def __init__(self) -> None:
        super().__init__()
        self.parts, self.by_part = ["other"], collections.defaultdict(lambda: {"ops": 0, "kernels": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_part[self.parts[-1]]["ops"] += 1
        self.by_part[self.parts[-1]]["kernels"] += not func.is_view
        return super().__torch_dispatch__(func, types, args, kwargs)

    def tag(self, module: torch.nn.Module, part: str) -> None:
        def enter(module, args) -> None:
            self.parts.append(part)

        def leave(module, args, output) -> None:  # a hook that returns something replaces the module's output
            self.parts.pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def tagged(self, fn, part: str):
        def wrapper(*args, **kwargs):
            self.parts.append(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts.pop()

        return wrapper


def forward_by_part(model: torch.nn.Module, batch: dict) -> dict:
    counter = OpsByPart()
    for name, module in model.named_modules():
        if isinstance(module, modeling_qwen2_vl.Qwen2VLRMSNorm):
            counter.tag(module, "rms_norm")
        elif isinstance(module, modeling_qwen2_vl.Qwen2MLP):
            counter.tag(module, "mlp")
        elif isinstance(module, torch.nn.LayerNorm):
            counter.tag(module, "layer_norm")
        elif name.split(".")[-1] == "lm_head":
            counter.tag(module, "lm_head")
    modeling_qwen2_vl.apply_multimodal_rotary_pos_emb = counter.tagged(
        modeling_qwen2_vl.apply_multimodal_rotary_pos_emb, "rope"
    )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.loss_function = counter.tagged(base.loss_function, "loss")
    with torch.autocast("cpu", dtype=torch.bfloat16), counter:
        model(**batch)
    return {"ops": counter.ops, "kernels": counter.kernels, "by_part": dict(counter.by_part)}


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
        if variant == "stock":
            inputs = {k: v for k, v in runner.collate(2).items() if not k.startswith("bbox_")}
            result["stock_forward_by_part"] = forward_by_part(runner.model, inputs)
            print("stock forward by part", result["stock_forward_by_part"], flush=True)
out.write_text(json.dumps(result, indent=1) + "\n")
