"""``grounding_image_cache``: collator throughput with the cache against without it, same process, same batches.

What the host's trainer does per batch before the model sees it (``dataloader_num_workers: 0``): the collator pads
the rows, decodes + resizes + patchifies every image (``mm_plugin.get_mm_inputs``) and computes the M-RoPE positions
with the model's ``get_rope_index``. This times one epoch of collation without the cache against one epoch served by
the cache (filled by an untimed first epoch), the two interleaved epoch by epoch (off, on, on, off, ...), each figure
the least of ``--repeat`` epochs, and checks every timed batch of the cached collator ``torch.equal`` to the uncached
one. Processor: Qwen2-VL-2B's published pixel bounds and the host's ``image_max_pixels`` default (768*768); images
COCO-like (``normal`` and ``big`` size classes, half above 768*768), one per row.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_image_cache.py --rows 64 --repeat 3 --out cache.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import write_model
from bench_grounding import run_info, tokenize, write_result, write_rows

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "pixel_values", "image_grid_thw")


def _epoch(collator, batches: list[list[dict]]) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds, collated batches) of collating every batch once."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = [collator(copy.deepcopy(batch)) for batch in batches]  # the collator pops keys off the rows it gets
    return time.perf_counter() - wall, time.process_time() - cpu, out


def run(work: Path, rows: int, batch_size: int, repeat: int) -> dict:
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.model import load_model
    from llamafactory_vision.grounding.image_cache import MIB, with_image_cache

    model_dir = write_model("qwen2vl-2b", work / "model", small=True, device="cpu", dtype=torch.float32)
    data_dir = work / "data"
    write_rows(data_dir, n=rows, size_classes=("normal", "big"), seed=1)
    args, tokenizer_module, template, dataset, _ = tokenize(
        model_dir, data_dir, work / "out", "qwen2_vl", "ours", "lora", "cpu"
    )
    model_args, _, _, finetuning_args, _ = args
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    keys = ("input_ids", "attention_mask", "labels", "images", "videos", "audios")
    features = [{k: row[k] for k in keys if k in row} for row in dataset]
    batches = [features[i : i + batch_size] for i in range(0, len(features), batch_size)]

    def collator(cache: bool):
        return SFTDataCollatorWith4DAttentionMask(
            template=with_image_cache(template, cache, 4096), model=model, pad_to_multiple_of=8,
            label_pad_token_id=IGNORE_INDEX, compute_dtype=model_args.compute_dtype, **tokenizer_module,
        )  # fmt: skip

    plain, cached = collator(False), collator(True)
    _epoch(plain, batches)  # untimed: warms PIL, torch and the allocator alike for both
    _epoch(cached, batches)  # untimed: fills the cache
    best = {"off": (float("inf"), float("inf")), "on": (float("inf"), float("inf"))}
    for round_ in range(repeat):
        order = (("off", plain), ("on", cached)) if round_ % 2 == 0 else (("on", cached), ("off", plain))
        outs = {}
        for name, col in order:
            wall, cpu, outs[name] = _epoch(col, batches)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        for a, b in zip(outs["off"], outs["on"], strict=True):
            for key in BATCH_KEYS:
                if not torch.equal(a[key], b[key]):
                    raise AssertionError(f"the cached collator gave another {key}")
    cache = cached.template.mm_plugin.image_cache
    figures = {"rows": len(features), "batch_size": batch_size, "repeat": repeat}
    for name in ("off", "on"):
        figures[f"cache_{name}_rows_per_s"] = round(len(features) / best[name][0], 1)
        figures[f"cache_{name}_rows_per_cpu_s"] = round(len(features) / best[name][1], 1)
    figures["ratio_on_over_off"] = round(best["off"][0] / best["on"][0], 2)
    figures["ratio_on_over_off_cpu"] = round(best["off"][1] / best["on"][1], 2)
    figures["cache_mib"] = round(cache.nbytes / MIB, 1)
    figures["cache_mib_per_image"] = round(cache.nbytes / MIB / len(cache), 2)
    figures["counts"] = vars(cache.counts)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs of each; the fastest counts")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from llamafactory_vision import _bootstrap

    _bootstrap.install()  # the .pth does this where the package is pip-installed; idempotent
    torch.set_num_threads(1)
    result = {
        "benchmark": "image_cache",
        **run_info("cpu"),
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result.update(run(Path(tmp), args.rows, args.batch_size, args.repeat))
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
