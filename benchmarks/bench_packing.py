"""What `packing` / `neat_packing` give a grounding run: tokens a step computes on, padded and packed.

Tokenizes the same COCO-like grounding rows (Qwen2-VL-2B processor bounds, host ``image_max_pixels`` 768*768, one
image and one ``rec`` object per row) without packing and with the host's ``neat_packing``, through the host's
``get_dataset`` as our grounding workflow calls it, and counts, for batches of ``--batch-size`` rows padded to the
longest row (the host's collator, ``pad_to_multiple_of`` 8), the tokens the model computes on and how many are padding;
packed rows are ``cutoff_len`` long each. The GPU step-time gain is not measured here (no GPU in this session): this is
the token arithmetic the gain comes from.

    python benchmarks/bench_packing.py --rows 256 --cutoff-len 4096 --out packing.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import write_model
from bench_grounding import write_result, write_rows


def _dataset(model_dir: Path, data_dir: Path, out: Path, cutoff_len: int, neat: bool) -> list[dict]:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from llamafactory_vision.grounding.head_data import ROWS_STAGE

    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "synth_ground_train", "dataset_dir": str(data_dir), "template": "qwen2_vl_ground",
        "cutoff_len": cutoff_len, "neat_packing": neat, "output_dir": str(out), "overwrite_output_dir": True,
        "overwrite_cache": True, "report_to": "none",
    })  # fmt: skip
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage=ROWS_STAGE, **tokenizer_module)
    return list(dataset["train_dataset"])


def _padded(lengths: list[int], batch_size: int) -> int:
    """Tokens of batches of ``batch_size`` rows, each padded to its longest row rounded up to a multiple of 8."""
    total = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i : i + batch_size]
        total += len(batch) * 8 * math.ceil(max(batch) / 8)
    return total


def run(work: Path, rows: int, cutoff_len: int, batch_size: int) -> dict:
    model_dir = write_model("qwen2vl-2b", work / "model", small=True, device="cpu", dtype=torch.float32)
    data_dir = work / "data"
    write_rows(data_dir, n=rows, size_classes=("normal", "big"), seed=1)
    plain = _dataset(model_dir, data_dir, work / "plain", cutoff_len, neat=False)
    packed = _dataset(model_dir, data_dir, work / "packed", cutoff_len, neat=True)
    lengths = [len(r["input_ids"]) for r in plain]
    real = sum(lengths)
    packed_real = sum(sum(1 for m in r["attention_mask"] if m) for r in packed)
    unpadded = _padded(lengths, batch_size)
    figures = {
        "rows": len(plain), "cutoff_len": cutoff_len, "batch_size": batch_size,
        "row_tokens_mean": round(real / len(plain), 1), "row_tokens_min": min(lengths), "row_tokens_max": max(lengths),
        "unpacked_tokens_computed": unpadded, "unpacked_padding_fraction": round(1 - real / unpadded, 3),
        "packed_rows": len(packed), "rows_per_pack": round(len(plain) / len(packed), 2),
        "packed_tokens_computed": len(packed) * cutoff_len,
        "packed_padding_fraction": round(1 - packed_real / (len(packed) * cutoff_len), 3),
        "packed_real_tokens": packed_real,
        "tokens_computed_ratio_unpacked_over_packed": round(unpadded / (len(packed) * cutoff_len), 3),
    }  # fmt: skip
    if packed_real != real:
        raise AssertionError(f"packing kept {packed_real} of {real} tokens (a row reached cutoff_len: raise it)")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cutoff-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from llamafactory_vision import _bootstrap

    _bootstrap.install()
    result = {
        "benchmark": "packing",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result.update(run(Path(tmp), args.rows, args.cutoff_len, args.batch_size))
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
