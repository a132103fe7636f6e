"""``bbox_fused_loss``: the bbox head's loss fused against unfused, forward + backward, same process, interleaved.

Two measures per device and box count N (boxes in one micro-batch):

- ``loss``: the loss alone, ``bbox_regression_loss`` vs ``fused_bbox_regression_loss`` on ``Tensor[N, 4]`` sigmoid
  predictions (a leaf) and targets, ``reduction="sum"`` as the trainer calls it: where the switch acts;
- ``head``: the trainer's ``bbox_head_loss`` (anchor gather, the head MLP, the loss) with a real ``BBoxHead`` (3
  layers, Qwen2-VL-2B's width 1536; 128 with ``--small``) on hidden states that need a gradient, as in training: what
  the switch changes of the head's whole cost.

Each timed call is forward + ``backward()`` of ``total``; a timed step is ``inner`` calls (chosen so that a step takes
about ``--step-ms``), then a device sync. The two variants take their steps interleaved
(:func:`~bench_grounding.interleaved_schedule`: ``--warmup`` shared untimed rounds, then ``--steps`` rounds in rotating
order); figures are totals over the timed steps, per call: wall microseconds (``speedup_fused_over_unfused``) and
CPU microseconds of this process (``speedup_cpu_s``: steadier on a shared machine; on a GPU, the host-side cost of
launching the kernels). Before timing, each setting checks that the fused and unfused ``total`` and gradients agree
(the benchmark times equal work). Torch runs one CPU thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_head_loss.py --out head_loss.json           # CPU (+ CUDA if present)
    python benchmarks/bench_head_loss.py --devices cuda --out head_loss.json              # the GPU step of gpu_all.sh
    python benchmarks/bench_head_loss.py --small                                          # seconds, any machine
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import arch_config
from bench_grounding import StepTiming, _sync, ratio_of_totals, time_interleaved, write_result

BOX_COUNTS = (8, 64, 512)
SMALL_BOX_COUNTS = (8, 64)
BOXES_PER_ROW = 8  # `head`: rows of 8 boxes each (a detection-style row); fewer boxes make one row
VARIANTS = ("unfused", "fused")


def loss_inputs(boxes: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred, target)``: ``Tensor[boxes, 4]`` cxcywh in (0, 1), pred a leaf needing a gradient (sigmoid outputs)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.sigmoid(torch.randn(boxes, 4, generator=g)).to(device).requires_grad_(True)
    target = torch.cat([torch.rand(boxes, 2, generator=g) * 0.6 + 0.2, torch.rand(boxes, 2, generator=g) * 0.4 + 0.05],
                       dim=1).to(device)  # fmt: skip
    return pred, target


def head_inputs(boxes: int, hidden_size: int, device: str, seed: int):
    """``(head, hidden, spans, targets)`` for ``bbox_head_loss``: rows of up to 8 boxes, each box's span 2 tokens."""
    from llamafactory_vision.grounding.bbox_head import BBoxHead, BBoxHeadConfig

    torch.manual_seed(seed)
    rows, per_row = max(1, boxes // BOXES_PER_ROW), min(boxes, BOXES_PER_ROW)
    head = BBoxHead(BBoxHeadConfig(hidden_size=hidden_size)).to(device)
    with torch.no_grad():  # a trained head: the zero-initialised last layer would predict one box for all
        head.bbox_fc2.weight.normal_(std=hidden_size**-0.5)
    hidden = torch.randn(rows, 2 * per_row, hidden_size, device=device, requires_grad=True)
    starts = torch.arange(per_row, device=device) * 2
    spans = torch.stack([starts, starts + 1], dim=-1).expand(rows, per_row, 2).contiguous()
    _, target = loss_inputs(rows * per_row, device, seed + 1)
    return head, hidden, spans, target.view(rows, per_row, 4)


def callables(measure: str, boxes: int, hidden_size: int, device: str):
    """``(calls, grads)``: variant -> a function running forward + backward once and returning ``total`` (detached),
    and a function returning the gradients the last call left (pred's; or the hidden states' and the head's)."""
    from llamafactory_vision.boxes import bbox_regression_loss
    from llamafactory_vision.grounding.fused_loss import fused_bbox_regression_loss
    from llamafactory_vision.grounding.trainer import BBoxLossConfig, bbox_head_loss

    if measure == "loss":
        pred, target = loss_inputs(boxes, device, seed=boxes)

        def of(loss_fn):
            def call():
                pred.grad = None
                total = loss_fn(pred, target, 5.0, 2.0, reduction="sum")["total"]
                total.backward()
                return total.detach()

            return call

        return {"unfused": of(bbox_regression_loss), "fused": of(fused_bbox_regression_loss)}, lambda: [pred.grad]

    head, hidden, spans, targets = head_inputs(boxes, hidden_size, device, seed=boxes)

    def of_config(fused: bool):
        config = BBoxLossConfig(1.0, 5.0, 2.0, "box_start", fused=fused)

        def call():
            head.zero_grad(set_to_none=True)
            hidden.grad = None
            total = bbox_head_loss(head, hidden, spans, targets, config)["total"]
            total.backward()
            return total.detach()

        return call

    calls = {"unfused": of_config(False), "fused": of_config(True)}
    return calls, lambda: [hidden.grad, *(p.grad for p in head.parameters())]


def check_equal(calls: dict[str, Callable[[], torch.Tensor]], grads_of: Callable[[], list], measure: str) -> dict:
    """Run each variant once; their ``total`` and gradients must agree to float32 rounding."""
    totals, grads = {}, {}
    for variant, call in calls.items():
        totals[variant] = call()
        grads[variant] = [g.clone() for g in grads_of()]
    total_diff = float((totals["fused"] - totals["unfused"]).abs())
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(grads["fused"], grads["unfused"], strict=True))
    grad_scale = max(float(g.abs().max()) for g in grads["unfused"])
    if total_diff > 1e-5 * max(1.0, float(totals["unfused"].abs())) or grad_diff > 1e-4 * grad_scale + 1e-12:
        raise AssertionError(f"{measure}: fused and unfused differ (total {total_diff}, gradient {grad_diff})")
    return {"max_abs_diff_total": total_diff, "max_abs_diff_grad": grad_diff}


def time_setting(calls, device: str, boxes: int, warmup: int, steps: int, step_ms: float) -> dict:
    """Interleaved timing of the variants; ``inner`` calls per step, sized on the unfused variant."""
    call = calls["unfused"]
    for _ in range(3):
        call()
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    inner = max(1, round(step_ms / 1000 / (time.perf_counter() - start)))

    cpu_seconds = {variant: [] for variant in VARIANTS}  # of the timed steps only (their last `steps` entries)

    def stepper(variant: str):
        def step(index: int) -> StepTiming:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(inner):
                total = calls[variant]()
            _sync(device)
            cpu_seconds[variant].append(time.process_time() - cpu_start)
            return StepTiming(seconds=time.perf_counter() - start, tokens=boxes * inner, flops=0.0, loss=float(total))

        return step

    timed, _ = time_interleaved({v: stepper(v) for v in VARIANTS}, warmup, steps)
    figures = {"inner": inner}
    for variant in VARIANTS:
        calls_timed = inner * len(timed[variant])
        figures[f"{variant}_us_per_call"] = round(sum(t.seconds for t in timed[variant]) / calls_timed * 1e6, 1)
        figures[f"{variant}_cpu_us_per_call"] = round(sum(cpu_seconds[variant][warmup:]) / calls_timed * 1e6, 1)
    figures["speedup_fused_over_unfused"] = ratio_of_totals(timed["fused"], timed["unfused"])
    figures["speedup_cpu_s"] = round(figures["unfused_cpu_us_per_call"] / figures["fused_cpu_us_per_call"], 4)
    figures["saved_us_per_call"] = round(figures["unfused_us_per_call"] - figures["fused_us_per_call"], 1)
    return figures


def run(devices: list[str], box_counts: tuple[int, ...], hidden_size: int, warmup: int, steps: int,
        step_ms: float) -> list[dict]:  # fmt: skip
    results = []
    for device in devices:
        for measure in ("loss", "head"):
            for boxes in box_counts:
                calls, grads_of = callables(measure, boxes, hidden_size, device)
                results.append({"device": device, "measure": measure, "boxes": boxes})
                results[-1].update(check_equal(calls, grads_of, measure))
                results[-1].update(time_setting(calls, device, boxes, warmup, steps, step_ms))
                print(json.dumps(results[-1]), file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="two box counts, a 128-wide head, short steps: seconds")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu",
                        help="comma-separated: cpu, cuda (default: cpu, and cuda when available)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2, help="shared untimed rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds, variants in rotating order (even)")
    parser.add_argument("--step-ms", type=float, default=None, help="target length of one timed step (default 20)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")

    torch.set_num_threads(1)
    width = arch_config("qwen2vl-2b", small=args.small)["text"]["hidden_size"]
    result = {
        "benchmark": "head_loss",
        "small": args.small,
        "cpu": platform.processor() or "cpu",
        "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "head_width": width,
    }
    step_ms = args.step_ms or (5.0 if args.small else 20.0)
    result["runs"] = run(devices, SMALL_BOX_COUNTS if args.small else BOX_COUNTS, width, args.warmup, args.steps,
                         step_ms)  # fmt: skip
    for r in result["runs"]:  # top-level numbers, which summarize.py's table lists
        result[f"speedup_{r['device']}_{r['measure']}_{r['boxes']}"] = r["speedup_fused_over_unfused"]
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
