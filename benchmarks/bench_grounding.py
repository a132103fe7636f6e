"""Grounding throughput: ours against the stock LLaMA-Factory baseline, measured in the same process.

Two measurements, each reported as a ratio (ours / stock):

1. ``tokenize``: rows/s of LLaMA-Factory's own ``get_dataset`` for the same images and the same answer text, once
   as a stock ``sharegpt`` dataset with template ``qwen2_vl`` (box text written by hand) and once as a ``grounding``
   dataset with template ``qwen2_vl_ground`` (validation, markers, rendering at the final size).
2. ``train_step``: seconds per optimizer step (forward + backward + AdamW) with ``bbox_head: true`` against
   ``bbox_head: false`` on identical batches, alternating the two to spread machine noise evenly.

    python benchmarks/bench_grounding.py --preset tiny --steps 30            # CPU
    python benchmarks/bench_grounding.py --preset qwen2vl-2b --device cuda   # GPU, Qwen2-VL-2B shapes, random weights

Prints one JSON object; copy the figures into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    # Sizes of the demo model; the 2B preset has Qwen2-VL-2B's transformer shapes (vocabulary stays tiny).
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vision_hidden_size=64, vision_depth=2),
    "qwen2vl-2b": dict(
        hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, vision_hidden_size=1280, vision_depth=32,
        vision_heads=16,
    ),
}  # fmt: skip


def _write_stock_twin(data_dir: Path) -> None:
    """A sharegpt copy of the grounding train split whose answers hold the same Qwen2-VL box text."""
    from llamafactory_vision.grounding.formats import GroundedObject, get_codec
    from PIL import Image

    codec = get_codec("qwen2_vl")
    rows = []
    for line in (data_dir / "ground_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        with Image.open(data_dir / row["images"][0]) as image:
            w, h = image.size
        objects = [
            GroundedObject(o["ref"], tuple(v / s for v, s in zip(o["bbox"], (w, h, w, h)))) for o in row["objects"]
        ]
        answer = codec.format_answer(objects, (w, h))
        rows.append({"messages": [{"role": "user", "content": "<image>Locate the object."},
                                  {"role": "assistant", "content": answer}], "images": row["images"]})  # fmt: skip
    (data_dir / "stock.json").write_text(json.dumps(rows))
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["stock"] = {"file_name": "stock.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "images": "images"},
                     "tags": {"role_tag": "role", "content_tag": "content",
                              "user_tag": "user", "assistant_tag": "assistant"}}  # fmt: skip
    (data_dir / "dataset_info.json").write_text(json.dumps(info))


def _pipeline(model_dir: Path, data_dir: Path, out: Path, template: str, dataset: str, stage: str, head: bool):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = get_train_args(dict(
        model_name_or_path=str(model_dir), stage="sft", do_train=True, finetuning_type="full", dataset=dataset,
        dataset_dir=str(data_dir), template=template, cutoff_len=1024, output_dir=str(out), overwrite_output_dir=True,
        overwrite_cache=True, report_to="none", bbox_head=head, freeze_vision_tower=False,
    ))  # fmt: skip
    model_args, data_args, training_args, _, _ = args
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    start = time.perf_counter()
    dataset_module = get_dataset(template_obj, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    seconds = time.perf_counter() - start
    return args, tokenizer_module, template_obj, dataset_module["train_dataset"], seconds


def bench_tokenize(model_dir: Path, data_dir: Path, work: Path) -> dict:
    stock = _pipeline(model_dir, data_dir, work / "a", "qwen2_vl", "stock", "sft", head=False)
    ours = _pipeline(model_dir, data_dir, work / "b", "qwen2_vl_ground", "synth_ground_train", "sft", head=False)
    rows = len(ours[3])
    return {
        "rows": rows,
        "stock_rows_per_s": round(len(stock[3]) / stock[4], 1),
        "ours_rows_per_s": round(rows / ours[4], 1),
        "ratio_ours_over_stock_time": round(ours[4] / stock[4], 3),
    }


def bench_train_step(model_dir: Path, data_dir: Path, work: Path, steps: int, batch_size: int, device: str) -> dict:
    from llamafactory.model import load_model
    from llamafactory_vision.grounding.bbox_head import attach_head
    from llamafactory_vision.grounding.head_data import BBOX_STAGE, GroundingBBoxCollator
    from llamafactory_vision.grounding.trainer import BBoxLossConfig, bbox_head_loss

    args, tokenizer_module, template, dataset, _ = _pipeline(
        model_dir, data_dir, work / "c", "qwen2_vl_ground", "synth_ground_train", BBOX_STAGE, head=True
    )
    model_args, _, _, finetuning_args, _ = args
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True).to(device)
    head = attach_head(model, model_args, finetuning_args, is_trainable=True).to(device)
    collator = GroundingBBoxCollator(template=template, model=model, label_pad_token_id=-100, **tokenizer_module)
    batches = [collator([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]) for i in range(4)]
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    config = BBoxLossConfig(loss_weight=1.0, l1_weight=5.0, giou_weight=2.0, source="box_start")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict, with_head: bool) -> float:
        inputs = {k: v for k, v in batch.items() if not k.startswith("bbox_")}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = model(**inputs, output_hidden_states=with_head)
        loss = outputs.loss
        if with_head:
            terms = bbox_head_loss(head, outputs.hidden_states[-1], batch["bbox_spans"], batch["bbox_targets"], config)
            loss = loss + terms["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(3):  # warm-up
        step(batches[i % 4], True), step(batches[i % 4], False)
    times = {True: [], False: []}
    for i in range(steps):
        order = (True, False) if i % 2 == 0 else (False, True)
        for with_head in order:
            times[with_head].append(step(batches[i % 4], with_head))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {
        "batch_size": batch_size,
        "steps": steps,
        "head_off_s_per_step": round(off, 4),
        "head_on_s_per_step": round(on, 4),
        "ratio_head_on_over_off": round(on / off, 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=400, help="synthetic rows (demo preset) to tokenize and train on")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from llamafactory_vision.synth import generate_grounding
    from llamafactory_vision.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny("qwen2_vl", work / "model", **PRESETS[args.preset])
        generate_grounding(work / "data", n=args.rows, seed=0, val_frac=0.1, preset="demo")
        _write_stock_twin(work / "data")
        result = {
            "preset": args.preset,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
            "tokenize": bench_tokenize(model_dir, work / "data", work),
            "train_step": bench_train_step(model_dir, work / "data", work, args.steps, args.batch_size, args.device),
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
