"""Ours-fast data-prep rows per CPU-second, as bench_grounding.bench_prep times its ``ours_fast`` path, without the
stock and host-path variants (which take minutes a run on a shared VM). Usage, in the code's root::

    PYTHONPATH=$ROOT/plugin OMP_NUM_THREADS=1 taskset -c 1 python fast_only_timing.py $ROOT 3

The rows (written once under /tmp/pp/work) are bench_prep's: ``write_rows(n=400, ("normal", "big"), seed=1)``.
"""

import sys
import time
from pathlib import Path

root = Path(sys.argv[1])
repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 3
sys.path.insert(0, str(root / "plugin"))
sys.path.insert(0, str(root / "benchmarks"))
from llamafactory_vision import _bootstrap

_bootstrap.install()
import torch

torch.set_num_threads(1)
import bench_grounding as bg

work, rows = Path("/tmp/pp/work"), 200
if not (work / "prep-data" / "stock_half.json").exists():
    work.mkdir(parents=True, exist_ok=True)
    bg.write_model("qwen2vl-2b", work / "prep-model", small=True, device="cpu", dtype=torch.float32)
    bg.write_rows(work / "prep-data", n=2 * rows, size_classes=("normal", "big"), seed=1)
    bg.write_stock_twin(work / "prep-data", "qwen2_vl", work / "prep-model")
    bg._register_half(work / "prep-data", rows)


def cpu_seconds(dataset: str) -> float:
    start = time.process_time()
    bg.tokenize(work / "prep-model", work / "prep-data", work / "out", "qwen2_vl", "ours", "lora", "cpu", True, dataset)
    return time.process_time() - start


half = min(cpu_seconds("synth_ground_half") for _ in range(repeat))
full = min(cpu_seconds("synth_ground_train") for _ in range(repeat))
print(f"{root}: half {half:.3f} full {full:.3f} rows/cpu-s {rows / (full - half):.1f}")
