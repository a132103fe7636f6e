"""Grounding throughput: ours against stock LLaMA-Factory 0.9.5, in the same run, on the same rows.

One command per workload; each prints one JSON object (and writes it to ``--out``):

- ``a``: Qwen2-VL-2B SFT, LoRA r8 (all linear layers of the LLM) and full fine-tuning, vision tower frozen (the host's
  defaults): stock ``qwen2_vl`` template on sharegpt rows vs ours (``grounding`` rows, ``qwen2_vl_ground``, fast
  tokenization) vs ours + bbox head.
- ``b``: Qwen2.5-VL-3B and Qwen3-VL-2B, LoRA r8: the same three variants.
- ``cpu``: one core: data preparation rows/s (convert + tokenize: stock vs ours with the host's image path vs ours
  fast), COCO conversion objects/s (synthetic ``instances.json``), ``eval/ground_eval.py`` predictions/s.

    python benchmarks/bench_grounding.py --workload a --device cuda --out a.json
    python benchmarks/bench_grounding.py --workload cpu --out cpu.json
    python benchmarks/bench_grounding.py --workload a --small          # CPU proof of the same code path

Models are the real architectures with random weights, built from the published configs (``benchmarks/arch.py``).
The stock rows hold exactly the text our template renders (same prompt, same box text), so both sides train on the
same tokens and the ratio measures our overhead only. A training step is what the host's trainer does with its
defaults (``dataloader_num_workers: 0``, gradient checkpointing, bf16 autocast): collate the batch (decode +
patchify images), forward, backward, AdamW step. The three variants of a run are built side by side and step
interleaved (:func:`interleaved_schedule`): ``--warmup`` shared untimed rounds, then ``--steps`` timed rounds in
rotating order, so that no variant is systematically timed first (the first harness, which timed them one after
another, charged ~40% of warm-up to the first variant on an H200).

Reported per variant, from its totals over the timed steps: samples/s, tokens/s (non-padding), peak GPU memory
(allocated: its resident tensors plus the largest transient of its own steps), MFU = model FLOPs per second /
``--peak-tflops`` (989: H100/H200 bf16 dense). Model FLOPs, PaLM-style: 2 x linear parameters per token forward
(LM head included, embeddings and the tiny bbox head/LoRA matrices not), plus 4 x layers x attention width x
sequence^2 per sequence (non-causal count) in the LLM and per image in the vision tower; LLM backward counts 2x
forward with full fine-tuning and 1x (activation gradients only) with LoRA; the frozen vision tower runs forward only.
Gradient-checkpointing recomputation is not counted (MFU, not hardware FLOPs utilisation). Also per variant: the
share of a step spent collating on the host (``collate_share``), and the ATen ops of one more, untimed step
(``ops_per_step``, ``kernel_ops_per_step``: :class:`OpCounter`), which is what a step costs the host where it is
launch-bound rather than compute-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import platform
import random
import runpy
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import arch_config, write_model

REPO = Path(__file__).resolve().parents[1]
GROUND_TEMPLATE = {"qwen2_vl": "qwen2_vl_ground", "qwen2_5_vl": "qwen2_5_vl_ground", "qwen3_vl": "qwen3_vl_ground"}
STOCK_TEMPLATE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl_nothink"}
VARIANTS = ("stock", "ours", "ours_head")
WORKLOADS = {
    "a": [("qwen2vl-2b", "lora"), ("qwen2vl-2b", "full")],
    "b": [("qwen2.5vl-3b", "lora"), ("qwen3vl-2b", "lora")],
}


# ---------------------------------------------------------------------------------------------- data


def write_rows(data_dir: Path, n: int, size_classes: tuple[str, ...], seed: int = 0) -> None:
    """Synthetic ``rec`` rows (one object per answer, xyxy pixel boxes) with images of ``size_classes``."""
    from llamafactory_vision.synth import generate_grounding
    from llamafactory_vision.synth.grounding import PRESETS

    preset = dataclasses.replace(
        PRESETS["varied"], size_classes=size_classes, task_weights=(1.0, 0.0, 0.0), format_weights=(1.0, 0.0, 0.0)
    )
    generate_grounding(data_dir, n=n, seed=seed, val_frac=0.0, preset=preset)


def write_stock_twin(data_dir: Path, family: str, model_dir: Path) -> None:
    """Register ``stock``: sharegpt rows holding exactly the prompt and answer text our template renders.

    Our converter turns each row into a prompt and marker answer; the markers are rendered with the family's codec at
    the model-view size (as our plugin does), so the stock side tokenizes the same text with the host's template.
    """
    from llamafactory_vision.boxes import model_view_size
    from llamafactory_vision.grounding.data import GroundingDatasetConverter
    from llamafactory_vision.grounding.dataset_attr import GroundingDatasetAttr
    from llamafactory_vision.grounding.formats import get_codec
    from llamafactory_vision.grounding.markers import render_markers
    from llamafactory_vision.grounding.plugin import original_size
    from llamafactory_vision.hparams import VisionDataArguments
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    codec = get_codec(family)
    attr = GroundingDatasetAttr("file", dataset_name="ground_train.jsonl")
    attr.join({"file_name": "ground_train.jsonl", "formatting": "grounding", "columns": {}})
    converter = GroundingDatasetConverter(
        attr, VisionDataArguments(template=GROUND_TEMPLATE[family], dataset_dir=str(data_dir))
    )
    rows = []
    for index, line in enumerate((data_dir / "ground_train.jsonl").read_text().splitlines()):
        converted = converter(json.loads(line), index)
        images = converted["_images"]

        def model_size(i: int, images=images) -> tuple[int, int]:
            return model_view_size(*original_size(images[i]), processor)

        messages = [
            {"role": m["role"], "content": render_markers(m["content"], codec, model_size)}
            for m in converted["_prompt"] + converted["_response"]
        ]
        rows.append({"messages": messages, "images": images})
    (data_dir / "stock.json").write_text(json.dumps(rows))
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["stock"] = {"file_name": "stock.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "images": "images"},
                     "tags": {"role_tag": "role", "content_tag": "content",
                              "user_tag": "user", "assistant_tag": "assistant"}}  # fmt: skip
    (data_dir / "dataset_info.json").write_text(json.dumps(info))


def _train_args(model_dir: Path, data_dir: Path, out: Path, family: str, variant: str, mode: str, device: str,
                fast: bool = True, dataset: str | None = None) -> tuple:  # fmt: skip
    from llamafactory.hparams import get_train_args

    dataset = dataset or ("stock" if variant == "stock" else "synth_ground_train")
    return get_train_args({
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": mode,
        "lora_rank": 8, "lora_target": "all", "dataset": dataset, "dataset_dir": str(data_dir), "cutoff_len": 2048,
        "output_dir": str(out), "overwrite_output_dir": True,
        "template": STOCK_TEMPLATE[family] if variant == "stock" else GROUND_TEMPLATE[family],
        "overwrite_cache": True, "report_to": "none", "bbox_head": variant == "ours_head",
        "bf16": device == "cuda", "grounding_fast_tokenize": fast,
    })  # fmt: skip


def tokenize(model_dir: Path, data_dir: Path, out: Path, family: str, variant: str, mode: str, device: str,
             fast: bool = True, dataset: str | None = None) -> tuple:  # fmt: skip
    """``(parsed args, tokenizer module, template, train dataset, seconds)`` of the host's ``get_dataset``."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer
    from llamafactory_vision.grounding.head_data import BBOX_STAGE

    args = _train_args(model_dir, data_dir, out, family, variant, mode, device, fast, dataset)
    model_args, data_args, training_args, _, _ = args
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    stage = BBOX_STAGE if variant == "ours_head" else "sft"
    start = time.perf_counter()
    train = get_dataset(template, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    return args, tokenizer_module, template, train["train_dataset"], time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Per-token and per-sequence FLOP coefficients of a Qwen-VL model (see the module docstring)."""

    llm_linear: int  # parameters of the LLM's linear layers incl. the LM head
    llm_attention: int  # layers x attention width (heads x head_dim)
    vision_linear: int
    vision_attention: int

    @classmethod
    def of(cls, model: torch.nn.Module, config) -> FlopModel:
        llm = vision = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or "lora_" in name or "bbox_head" in name:
                continue
            if ".visual." in f".{name}.":
                vision += module.weight.numel()
            else:
                llm += module.weight.numel()
        text, vis = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        vision_width = getattr(vis, "embed_dim", None) or vis.hidden_size
        return cls(llm, text.num_hidden_layers * text.num_attention_heads * head_dim, vision, vis.depth * vision_width)

    def step_flops(self, lengths: torch.Tensor, patches: torch.Tensor, lora: bool) -> float:
        """FLOPs of one training step: ``lengths`` LongTensor[B] tokens per row, ``patches`` LongTensor[N] per image."""
        lengths, patches = lengths.double(), patches.double()
        llm = 2 * self.llm_linear * lengths.sum() + 4 * self.llm_attention * (lengths**2).sum()
        vision = 2 * self.vision_linear * patches.sum() + 4 * self.vision_attention * (patches**2).sum()
        return float(llm * (2 if lora else 3) + vision)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _progress(message: str) -> None:
    """A timestamped line on stderr: the tail gpu_all.sh keeps of a step that ran out of time shows its last phase."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One timed training step: wall seconds, non-padding tokens, model FLOPs, loss, the memory it allocated on top
    of what was resident before it and the process's peak allocation during it (bytes; 0 on a CPU), and the wall
    seconds of the step spent collating the batch on the host CPU (part of ``seconds``)."""

    seconds: float
    tokens: int
    flops: float
    loss: float
    transient_bytes: int = 0
    peak_bytes: int = 0
    collate_seconds: float = 0.0


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it: ``ops`` all of them, ``kernels`` those that are not views.

    On a GPU each non-view op launches at least one kernel and every op costs the host its dispatch, so at small
    batches a step's time follows these counts rather than its FLOPs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def interleaved_schedule(variants: Sequence[str], warmup: int, steps: int) -> list[tuple[str, int, bool]]:
    """The order in which the variants take their steps: ``(variant, step index, timed)`` triples.

    Round ``r`` (``0 <= r < warmup + steps``) gives every variant its step ``r`` (so all variants train on the same
    batches in the same order); the first ``warmup`` rounds are the shared, untimed warm-up. In the timed rounds the
    order rotates by one variant per round (a Latin square: ``ABC``, ``BCA``, ``CAB``, ...), so that no variant is
    systematically first or last in a round: with ``steps`` a multiple of ``len(variants)`` each variant takes every
    position equally often. Timing the variants one after the other cost the first one ~40% on an H200 (warm-up the
    untimed steps did not absorb); interleaving spreads whatever is left over all variants alike.
    """
    order = []
    for r in range(warmup + steps):
        k = (r - warmup) % len(variants) if r >= warmup else 0
        order += [(variant, r, r >= warmup) for variant in (*variants[k:], *variants[:k])]
    return order


def time_interleaved(
    steppers: Mapping[str, Callable[[int], StepTiming]], warmup: int, steps: int
) -> tuple[dict[str, list[StepTiming]], list[str]]:
    """Run :func:`interleaved_schedule` over ``steppers`` (variant -> function taking the step index).

    Returns the timed steps of each variant, in step order, and the order the timed steps ran in (variant names).
    """
    timed: dict[str, list[StepTiming]] = {variant: [] for variant in steppers}
    order = []
    for variant, index, is_timed in interleaved_schedule(tuple(steppers), warmup, steps):
        timing = steppers[variant](index)
        if is_timed:
            timed[variant].append(timing)
            order.append(variant)
    return timed, order


def variant_figures(timed: Sequence[StepTiming], batch_size: int, peak_tflops: float, device: str,
                    resident_bytes: int) -> dict:  # fmt: skip
    """Throughput of one variant from the totals of its timed steps (sum of tokens / sum of seconds, not a mean of
    per-step rates). ``peak_gib`` on a GPU: the variant's resident tensors (weights, optimizer state) plus the largest
    transient allocation of its steps, i.e. its peak had it run alone, since the other variants stay resident."""
    seconds = sum(t.seconds for t in timed)
    tokens = sum(t.tokens for t in timed)
    collate = sum(t.collate_seconds for t in timed)
    figures = {
        "seconds": round(seconds, 4),
        "tokens": tokens,
        "samples_per_s": round(batch_size * len(timed) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_sample": round(tokens / (batch_size * len(timed)), 1),
        "s_per_step": round(seconds / len(timed), 4),
        # the host-CPU part of a step: what grounding_image_cache can shorten and no GPU kernel can
        "collate_s_per_step": round(collate / len(timed), 4),
        "collate_share": round(collate / seconds, 4),
        "losses": [round(t.loss, 4) for t in timed],
    }
    if device == "cuda":
        figures["peak_gib"] = round((resident_bytes + max(t.transient_bytes for t in timed)) / 2**30, 2)
        figures["mfu"] = round(sum(t.flops for t in timed) / seconds / (peak_tflops * 1e12), 4)
    return figures


def ratio_of_totals(ours: Sequence[StepTiming], stock: Sequence[StepTiming]) -> float:
    """Tokens/s of ``ours`` over tokens/s of ``stock``, each from its totals over the timed steps."""
    rate = [sum(t.tokens for t in ts) / sum(t.seconds for t in ts) for ts in (ours, stock)]
    return round(rate[0] / rate[1], 4)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


@dataclasses.dataclass
class VariantRunner:
    """One variant's model, optimizer, collator and data, ready to step (see :func:`build_variant`)."""

    step: Callable[[int], StepTiming]
    resident_bytes: Callable[[], int]
    info: dict
    model: torch.nn.Module
    collate: Callable[[int], dict]  # step index -> that step's batch, on the device


def build_variant(model_dir: Path, data_dir: Path, work: Path, family: str, variant: str, mode: str, *,
                  device: str, batch_size: int) -> VariantRunner:  # fmt: skip
    """Tokenize the rows, load the model (and head) and build the collator and optimizer of one variant."""
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.model import load_model
    from llamafactory_vision.grounding.bbox_head import attach_head
    from llamafactory_vision.grounding.head_data import GroundingBBoxCollator
    from llamafactory_vision.grounding.trainer import BBoxLossConfig, bbox_head_loss

    build_start = time.perf_counter()
    args, tokenizer_module, template, dataset, tokenize_s = tokenize(
        model_dir, data_dir, work / f"{variant}-{mode}", family, variant, mode, device
    )
    model_args, _, _, finetuning_args, _ = args
    with_head = variant == "ours_head"
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True).to(device)
    model.train()
    head = attach_head(model, model_args, finetuning_args, is_trainable=True) if with_head else None
    collator_class = GroundingBBoxCollator if with_head else SFTDataCollatorWith4DAttentionMask
    collator = collator_class(
        template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        compute_dtype=model_args.compute_dtype, attn_implementation=getattr(model.config, "_attn_implementation", None),
        **tokenizer_module,
    )  # fmt: skip
    head_config = BBoxLossConfig(  # as the grounding workflow builds it: the source is the head's own setting
        finetuning_args.bbox_loss_weight, finetuning_args.bbox_l1_weight, finetuning_args.bbox_giou_weight,
        head.config.source if with_head else "box_start",
    )  # fmt: skip
    # fused on every device, so a CPU step dispatches what a GPU step does: one optimizer op, where the CPU's default
    # loops over the tensors (~10 ops each, ~3.9k a LoRA step of Qwen2-VL-2B)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    flop_model = FlopModel.of(model, model.config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def collate(index: int) -> dict:
        batch = collator([dataset[(index * batch_size + j) % len(dataset)] for j in range(batch_size)])
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(index: int) -> StepTiming:
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        start = time.perf_counter()
        batch = collate(index)
        collated = time.perf_counter()  # the copies are only queued: this is the host's share, not the transfer's
        inputs = {k: v for k, v in batch.items() if not k.startswith("bbox_")}
        with autocast:
            outputs = model(**inputs, output_hidden_states=with_head)
            loss = outputs.loss
            if with_head:
                terms = bbox_head_loss(head, outputs.hidden_states[-1], batch["bbox_spans"], batch["bbox_targets"],
                                       head_config)  # fmt: skip
                # the box mean, as GroundingTrainer normalises it on the host's default (mean) loss path
                head_term = terms["total"] / terms["boxes"].clamp_min(1)
                loss = loss + head_config.loss_weight * head_term.to(loss.dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0  # since this step's reset
        lengths = batch["attention_mask"].sum(-1).cpu()
        patches = batch["image_grid_thw"].prod(-1).cpu()
        flops = flop_model.step_flops(lengths, patches, mode == "lora")
        return StepTiming(
            seconds, int(lengths.sum()), flops, float(loss.detach()), peak - base, peak, collated - start
        )

    def resident_bytes() -> int:  # weights, buffers, optimizer state (gradients are freed after each step)
        state = [v for s in optimizer.state.values() for v in s.values()]
        return _tensor_bytes([*model.parameters(), *model.buffers(), *state])

    info = {
        "rows_tokenized_per_s": round(len(dataset) / tokenize_s, 1),
        "build_s": round(time.perf_counter() - build_start, 1),  # tokenize + load the model (and head) + optimizer
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return VariantRunner(step, resident_bytes, info, model, collate)


def run_training(workload: str, small: bool, device: str, work: Path, args: argparse.Namespace, save) -> dict:
    """All runs of ``workload``; ``save({"runs": [...]})`` after each run, so a time cap keeps the finished ones.

    In each run the three variants are built side by side (all resident at once) and take their steps interleaved
    (:func:`interleaved_schedule`): a shared warm-up of ``--warmup`` rounds, then ``--steps`` timed rounds in rotating
    order. Ratios are tokens/s from each variant's totals over its timed steps.
    """
    batch_size = args.batch_size or (2 if small else 8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    data_dir = work / "data"
    write_rows(data_dir, n=max(batch_size * (args.warmup + args.steps), 16), size_classes=("normal",))
    runs = []
    for arch, mode in WORKLOADS[workload]:
        run_start = time.perf_counter()
        phases = {}  # wall seconds of each phase, so a run that hits gpu_all.sh's time cap says where the time went
        family = arch_config(arch, small)["family"]
        model_dir = work / f"model-{arch}"
        if not model_dir.exists():
            _progress(f"{arch} {mode}: writing the random-weight model")
            write_model(arch, model_dir, small, device, dtype)
            phases["write_model_s"] = round(time.perf_counter() - run_start, 1)
        arch_data = work / f"data-{arch}"
        if not arch_data.exists():  # the stock twin depends on the family's box text
            shutil.copytree(data_dir, arch_data)
            write_stock_twin(arch_data, family, model_dir)
        _free(device)
        runners = {}
        for variant in VARIANTS:
            _progress(f"{arch} {mode}: building {variant}")
            runners[variant] = build_variant(
                model_dir, arch_data, work, family, variant, mode, device=device, batch_size=batch_size
            )
        _progress(f"{arch} {mode}: {args.warmup} warm-up + {args.steps} timed rounds")
        steps_start = time.perf_counter()
        timed, order = time_interleaved({v: r.step for v, r in runners.items()}, args.warmup, args.steps)
        phases["rounds_s"] = round(time.perf_counter() - steps_start, 1)  # warm-up and timed, all variants
        variants = {
            variant: {
                "variant": variant,
                "mode": mode,
                **runner.info,
                **variant_figures(timed[variant], batch_size, args.peak_tflops, device, runner.resident_bytes()),
            }
            for variant, runner in runners.items()
        }
        for figures in variants.values():
            print(json.dumps({"arch": arch, **figures}), file=sys.stderr, flush=True)
        # Same rows, same tokens, same seed: the LM losses of stock and ours differ by kernel noise only.
        loss_diff = max(abs(a - b) for a, b in zip(variants["ours"]["losses"], variants["stock"]["losses"]))
        run = {
            "arch": arch, "mode": mode, "batch_size": batch_size, "schedule": "interleaved", "timed_order": order,
            "variants": variants,
            "ratio_ours_over_stock": ratio_of_totals(timed["ours"], timed["stock"]),
            "ratio_head_over_stock": ratio_of_totals(timed["ours_head"], timed["stock"]),
            "max_loss_diff_ours_vs_stock": round(loss_diff, 5),
            "phases": {**phases, "run_s": round(time.perf_counter() - run_start, 1)},
        }  # fmt: skip
        if device == "cuda":  # each step resets the peak counter, so the process peak is the largest step peak
            run["process_peak_gib"] = round(max(t.peak_bytes for ts in timed.values() for t in ts) / 2**30, 2)
        runs.append(run)
        save({"runs": runs})  # the timings are kept even if counting below fails
        for variant, runner in runners.items():  # one more step each, untimed: counting slows the dispatch
            with OpCounter() as counter:
                runner.step(args.warmup + args.steps)
            variants[variant].update(ops_per_step=counter.ops, kernel_ops_per_step=counter.kernels)
        del runners, timed  # free this run's models before the next run's are built
        save({"runs": runs})
    return {"runs": runs}


# ---------------------------------------------------------------------------------------------- CPU


def _register_half(data_dir: Path, rows: int) -> None:
    """Register ``synth_ground_half`` and ``stock_half``: the first ``rows`` rows of the grounding and stock sets."""
    lines = (data_dir / "ground_train.jsonl").read_text().splitlines()[:rows]
    (data_dir / "ground_half.jsonl").write_text("\n".join(lines) + "\n")
    (data_dir / "stock_half.json").write_text(json.dumps(json.loads((data_dir / "stock.json").read_text())[:rows]))
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["synth_ground_half"] = {**info["synth_ground_train"], "file_name": "ground_half.jsonl"}
    info["stock_half"] = {**info["stock"], "file_name": "stock_half.json"}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))


def bench_prep(work: Path, rows: int, repeat: int = 1) -> dict:
    """Data preparation rows/s on one core: the host's ``get_dataset`` (load, convert, tokenize) on the same rows.

    The rate is marginal, ``rows / (t(2 x rows) - t(rows))``, so that the fixed start-up of ``datasets`` (seconds,
    whatever the size) does not count as per-row cost; ``*_rows_per_cpu_s`` uses the process's CPU time instead of
    wall time (one thread), the figure to trust on a shared machine. Each time is the least of ``repeat`` runs.
    """
    model_dir = work / "prep-model"
    write_model("qwen2vl-2b", model_dir, small=True, device="cpu", dtype=torch.float32)
    data_dir = work / "prep-data"
    write_rows(data_dir, n=2 * rows, size_classes=("normal", "big"), seed=1)  # COCO-like sizes, some > 768*768
    write_stock_twin(data_dir, "qwen2_vl", model_dir)
    _register_half(data_dir, rows)
    figures, ids = {"rows": rows, "repeat": repeat}, {}
    paths = (("stock", "stock", True), ("ours_host_path", "ours", False), ("ours_fast", "ours", True))
    for name, variant, fast in paths:
        full_name, half_name = (
            ("stock", "stock_half") if variant == "stock" else ("synth_ground_train", "synth_ground_half")
        )
        seconds, cpu_seconds = {}, {}
        for dataset in (half_name, full_name):
            for _ in range(repeat):
                cpu_start = time.process_time()
                *_, train, wall = tokenize(
                    model_dir, data_dir, work / name, "qwen2_vl", variant, "lora", "cpu", fast, dataset
                )
                cpu = time.process_time() - cpu_start
                seconds[dataset] = min(wall, seconds.get(dataset, wall))
                cpu_seconds[dataset] = min(cpu, cpu_seconds.get(dataset, cpu))
        ids[name] = [row["input_ids"] for row in train]
        figures[f"{name}_rows_per_s"] = round(rows / (seconds[full_name] - seconds[half_name]), 1)
        figures[f"{name}_rows_per_cpu_s"] = round(rows / (cpu_seconds[full_name] - cpu_seconds[half_name]), 1)
    if not ids["stock"] == ids["ours_host_path"] == ids["ours_fast"]:
        raise AssertionError("the three data paths tokenized the same rows differently")
    for name in ("ours_host_path", "ours_fast"):
        figures[f"ratio_{name}_over_stock"] = round(figures[f"{name}_rows_per_s"] / figures["stock_rows_per_s"], 3)
        figures[f"ratio_{name}_over_stock_cpu"] = round(
            figures[f"{name}_rows_per_cpu_s"] / figures["stock_rows_per_cpu_s"], 3
        )
    return figures


def bench_convert(work: Path, objects: int, repeat: int = 1) -> dict:
    """COCO conversion objects/s: a synthetic ``instances.json`` (80 categories, 5 objects per image); the least
    time of ``repeat`` runs.

    The converter opens every image's header to check its size against the JSON, so each image exists: hard links
    to one 640x480 JPEG (the header read per file is timed, the disk space is not spent)."""
    from llamafactory_vision.grounding.convert import convert_coco
    from PIL import Image

    rng = random.Random(0)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(objects // 5)]
    images_dir = work / "coco_images"
    images_dir.mkdir()
    Image.new("RGB", (640, 480), (120, 90, 60)).save(work / "one.jpg")
    for record in images:
        os.link(work / "one.jpg", images_dir / record["file_name"])
    annotations = []
    for k in range(objects):
        x, y = rng.uniform(0, 600), rng.uniform(0, 440)
        annotations.append({"id": k, "image_id": k // 5, "category_id": rng.randrange(1, 81), "iscrowd": 0,
                            "bbox": [x, y, rng.uniform(1, 640 - x), rng.uniform(1, 480 - y)]})  # fmt: skip
    categories = [{"id": c, "name": f"category {c}"} for c in range(1, 81)]
    path = work / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    seconds = cpu_seconds = math.inf
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = convert_coco(path, str(images_dir), work / "coco.jsonl")
        seconds = min(seconds, time.perf_counter() - start)
        cpu_seconds = min(cpu_seconds, time.process_time() - cpu_start)
    return {
        "objects": objects,
        "repeat": repeat,
        "boxes_written": stats.objects,
        "objects_per_s": round(objects / seconds, 1),
        "objects_per_cpu_s": round(objects / cpu_seconds, 1),
    }


def bench_ground_eval(work: Path, rows: int, repeat: int = 1) -> dict:
    """``eval/ground_eval.py`` predictions/s on Qwen2-VL answers (file read, parse, IoU, summary); the least time of
    ``repeat`` runs."""
    rng = random.Random(0)
    path = work / "generated_predictions.jsonl"
    with path.open("w") as f:
        for _ in range(rows):
            box = [rng.randrange(0, 500), rng.randrange(0, 500)]
            box += [box[0] + rng.randrange(1, 500), box[1] + rng.randrange(1, 500)]
            noisy = [min(1000, max(0, v + rng.randrange(-40, 41))) for v in box]
            label = f"the red circle({box[0]},{box[1]}),({box[2]},{box[3]})"
            predict = f"the red circle({noisy[0]},{noisy[1]}),({noisy[2]},{noisy[3]})"
            f.write(json.dumps({"prompt": "", "predict": predict, "label": label}) + "\n")
    namespace = runpy.run_path(str(REPO / "eval" / "ground_eval.py"))
    seconds = cpu_seconds = math.inf
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = namespace["main"](["--predictions", str(path)])
        seconds = min(seconds, time.perf_counter() - start)
        cpu_seconds = min(cpu_seconds, time.process_time() - cpu_start)
    return {
        "rows": rows,
        "repeat": repeat,
        "predictions_per_s": round(rows / seconds, 1),
        "predictions_per_cpu_s": round(rows / cpu_seconds, 1),
        "acc@0.5": metrics.get("acc@0.5"),
    }


def run_cpu(small: bool, work: Path, repeat: int = 1) -> dict:
    torch.set_num_threads(1)
    return {
        "threads": torch.get_num_threads(),
        "prep": bench_prep(work, rows=40 if small else 200, repeat=repeat),
        "convert": bench_convert(work, objects=5_000 if small else 100_000, repeat=repeat),
        "ground_eval": bench_ground_eval(work, rows=2_000 if small else 20_000, repeat=repeat),
    }


def run_info(device: str) -> dict:
    """What a result file records of its run: the device (the GPU's name, else the CPU's), torch, date, command."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }


def write_result(result: dict, out: Path | None) -> None:
    """Write a benchmark's result object as JSON to ``out`` (parents created); nothing when ``out`` is None."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("a", "b", "cpu"), required=True)
    parser.add_argument("--small", action="store_true", help="scaled-down models and rows: the code path on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --small)")
    parser.add_argument("--warmup", type=int, default=3, help="shared untimed rounds (one step of every variant each)")
    parser.add_argument(
        "--steps", type=int, default=9, help="timed rounds, variants in rotating order (a multiple of 3 balances it)"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100/H200)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="cpu: time each measurement this many times and keep the fastest"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.workload != "cpu" and args.device == "cpu" and not args.small:
        parser.error("real-size training on a CPU would take hours: add --small, or run on a GPU")

    from llamafactory_vision import _bootstrap

    _bootstrap.install()  # the .pth does this where the package is pip-installed; idempotent
    result = {"workload": args.workload, "small": args.small, **run_info(args.device)}

    def save(partial: dict) -> None:
        result.update(partial)
        write_result(result, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.workload == "cpu":
            save(run_cpu(args.small, work, args.repeat))
        else:
            save(run_training(args.workload, args.small, args.device, work, args, save))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
