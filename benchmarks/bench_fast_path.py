"""The grounding fast path against stock LLaMA-Factory defaults: whole training runs, each switch alone and all on.

Issue 11's goal: >= 1.3x stock tokens/s on Qwen2-VL-2B grounding LoRA at an equal loss curve. Each variant is a
complete training run through the host's own entry (``llamafactory.train.tuner.run_exp``, what ``llamafactory-cli
train`` calls) in a fresh Python process, on the same rows, for the same whole epochs, with the same seeds:

- ``stock``: the stock ``qwen2_vl`` template on a sharegpt copy of the rows holding exactly the text our template
  renders (bench_grounding.write_stock_twin), LLaMA-Factory's defaults, no switch;
- ``ours`` + one switch, for each entry of :data:`VARIANTS` (``ours`` alone is our grounding rows and template with
  every switch off, ``grounding_fast_tokenize: false`` included: the host's data path, same tokens as stock);
- ``all``: every switch on (``enable_liger_kernel`` only on CUDA with liger-kernel installed; skipped, and said so,
  elsewhere).

Extending the ablation by a switch is one entry in :data:`SWITCHES` (YAML overrides; ``all`` takes their union).
Processes run in rotating order (``interleaved_schedule`` of bench_grounding.py over the variants, ``--repeats``
rounds), so no variant is always first; each process is alone on the machine while it runs.

Timing (a ``TrainerCallback``, :class:`RunClock`): a step is the wall time from the previous step's end (or its
epoch's start) to this step's ``on_step_end``, after a CUDA synchronise, so it includes fetching and collating the
batch (where the image cache acts), forward, backward, the optimizer step and the host's per-step logging. Warm-up is
not dropped: the headline ``tokens_per_s`` covers every step of every epoch, and ``epochs[i]`` gives each epoch's own
figure (epoch 1 holds the warm-up and the image cache's misses). ``end_to_end_tokens_per_s`` divides by the whole
``run_exp`` call instead (data preparation + model load + training + saving), so a faster data path counts there.

Tokens: every non-padding token of every row trained, i.e. per epoch the sum over the training dataset's rows of
their nonzero ``attention_mask`` entries (an unpacked row is all ones; a ``neat_packing`` pack marks its rows 1..k
and its padding 0), times the epochs. Padding never counts, so packing gains only by computing less padding. The
driver tokenizes the rows once itself (ours, fast) and every run's count must equal that count, else it stops.

Equal loss curve: per-step losses come from the host's log (``logging_steps: 1``). Packing regroups rows into other
steps, and a step's loss is the token mean of what that step holds, so per-step curves of packed and unpacked runs
are not comparable step by step. What every variant shares is each epoch's rows: the criterion compares **per-epoch
means of the step losses** with stock's, and calls them equal when ``|mean_ours - mean_stock| <= 2 * sqrt(se_ours^2
+ se_stock^2)`` in every epoch, ``se`` being the standard error of the epoch's mean estimated from the step losses'
scatter around a straight line fitted over that epoch (the step-to-step noise, the loss's trend taken out; see
:func:`epoch_noise`). Variants that leave the batches unchanged (fast tokenize, image cache) should give stock's
losses exactly on a CPU; ``max_step_loss_diff`` reports it.

    python benchmarks/bench_fast_path.py --small --out fast_path.json            # CPU: the code path, tiny shapes
    python benchmarks/bench_fast_path.py --device cuda --rows 800 --epochs 2 --out fast_path.json   # 200 steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from llamafactory_vision import _bootstrap
from llamafactory_vision._bootstrap import DISABLE_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch import write_model
from bench_grounding import (
    GROUND_TEMPLATE,
    STOCK_TEMPLATE,
    interleaved_schedule,
    run_info,
    tokenize,
    write_result,
    write_rows,
    write_stock_twin,
)

ARCH = "qwen2vl-2b"
FAMILY = "qwen2_vl"
# Each switch alone: YAML overrides on top of ``ours`` (our rows and template, every switch off).
SWITCHES: dict[str, dict] = {
    "fast_tokenize": {"grounding_fast_tokenize": True},
    "image_cache": {"grounding_image_cache": True, "grounding_image_cache_mib": 8192},
    "packing": {"neat_packing": True},  # with cutoff_len set to the packing length (see pack_cutoff)
    "liger": {"enable_liger_kernel": True},
}
CUDA_ONLY = frozenset({"liger"})  # Triton kernels: no CPU path
OURS_BASE = {"grounding_fast_tokenize": False}  # our data path with the host's image preprocessing


def variant_overrides(switches: dict[str, dict]) -> dict[str, dict | None]:
    """Variant name -> YAML overrides: ``stock`` (None: the stock twin), ``ours``, one per switch, ``all``."""
    union = {k: v for overrides in switches.values() for k, v in overrides.items()}
    return {"stock": None, "ours": {}, **switches, "all": union}


def unavailable(switch: str, device: str) -> str | None:
    """Why ``switch`` cannot run on ``device`` here, or None."""
    if switch in CUDA_ONLY and device != "cuda":
        return "needs CUDA (Triton kernels)"
    if switch == "liger" and find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    return None


def run_config(overrides: dict | None, *, model_dir: Path, data_dir: Path, out: Path, device: str,
               batch_size: int, epochs: int, pack_cutoff: int, learning_rate: float) -> dict:  # fmt: skip
    """The ``run_exp`` arguments of one variant (what a user would write in the YAML)."""
    config = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_target": "all", "dataset_dir": str(data_dir), "cutoff_len": 4096,
        "output_dir": str(out), "overwrite_output_dir": True, "overwrite_cache": True, "report_to": "none",
        "per_device_train_batch_size": batch_size, "num_train_epochs": epochs, "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "seed": 0, "bf16": device == "cuda",
    }  # fmt: skip
    if overrides is None:
        return {**config, "dataset": "stock", "template": STOCK_TEMPLATE[FAMILY]}
    config = {**config, "dataset": "synth_ground_train", "template": GROUND_TEMPLATE[FAMILY], **OURS_BASE}
    if overrides.get("neat_packing"):
        # as many packs as unpacked batches, one a step: the same number of optimizer steps per epoch
        config.update(per_device_train_batch_size=1, cutoff_len=pack_cutoff)
    return {**config, **overrides}


def pack_cutoff(lengths: list[int], batch_size: int) -> int:
    """Packing length (``cutoff_len``) for rows of ``lengths`` tokens: the least multiple of 8, no shorter than the
    longest row (none cut) nor than ``batch_size`` mean rows, at which the host's own packer (``greedy_knapsack``)
    makes no more packs than there are unpacked batches: one pack a step then gives the same optimizer steps per epoch
    as the unpacked runs (the loss curves are compared epoch by epoch)."""
    from llamafactory.data.processor.processor_utils import greedy_knapsack

    batches = math.ceil(len(lengths) / batch_size)
    cutoff = 8 * math.ceil(max(max(lengths), batch_size * sum(lengths) / len(lengths)) / 8)
    while len(greedy_knapsack(list(lengths), cutoff)) > batches:  # it sorts and empties the list it is given
        cutoff += 8
    return cutoff


def real_tokens(dataset) -> int:
    """Non-padding tokens of a tokenized dataset: nonzero ``attention_mask`` entries (all ones in an unpacked row; a
    neat-packed row numbers its rows 1..k and pads with 0)."""
    return sum(sum(1 for m in mask if m) for mask in dataset["attention_mask"])


# ---------------------------------------------------------------------------------------------- one run (worker)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _run_clock():
    from transformers import TrainerCallback

    class RunClock(TrainerCallback):
        """Step times (batch fetch + collate + step + logging), losses and what the run's data path did."""

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.info: dict = {}
            self.mark = self.train_begin = self.train_end = self.cpu_mark = 0.0

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            dataset = train_dataloader.dataset
            plugin = getattr(getattr(train_dataloader.collate_fn, "template", None), "mm_plugin", None)
            self.cache = getattr(plugin, "image_cache", None)
            self.info = {
                "dataset_rows": len(dataset),
                "tokens_per_epoch": real_tokens(dataset),
                "packed": any(max(mask) > 1 for mask in dataset["attention_mask"]),
                "image_cache_on": self.cache is not None,
            }
            _sync()
            self.train_begin = time.perf_counter()

        def on_epoch_begin(self, args, state, control, **kwargs):
            _sync()
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()
            self.epoch = len({s["epoch"] for s in self.steps})

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            now, cpu = time.perf_counter(), time.process_time()
            self.steps.append({"epoch": self.epoch, "seconds": now - self.mark, "cpu_seconds": cpu - self.cpu_mark})
            self.mark, self.cpu_mark = now, cpu

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps:
                self.steps[-1]["loss"] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            _sync()
            self.train_end = time.perf_counter()
            if self.cache is not None:
                self.info["image_cache_counts"] = dict(vars(self.cache.counts))

    return RunClock()


def run_variant(config: dict) -> dict:
    """Train one variant through ``run_exp`` in this process; its clock's figures."""
    from llamafactory.train.tuner import run_exp

    clock = _run_clock()
    start = time.perf_counter()
    run_exp(dict(config), callbacks=[clock])
    wall = time.perf_counter() - start
    result = {
        **clock.info,
        "plugin_loaded": "llamafactory_vision.patches" in sys.modules,
        "run_seconds": round(wall, 3),
        "before_training_seconds": round(clock.train_begin - start, 3),  # data prep + model load + trainer build
        "train_seconds": round(clock.train_end - clock.train_begin, 3),
        "steps": clock.steps,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


# ---------------------------------------------------------------------------------------------- figures


def epoch_noise(losses: list[float]) -> float:
    """Standard error of the mean of ``losses`` (one epoch's step losses, in step order) from their scatter around a
    least-squares line over the step index: the step-to-step noise, with the loss's trend over the epoch taken out.
    Fewer than 3 steps leave no scatter to measure: infinite."""
    n = len(losses)
    if n < 3:
        return math.inf
    x = torch.arange(n, dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    residual = y - (y.mean() + slope * (x - x.mean()))
    return float((residual.pow(2).sum() / (n - 2)).sqrt() / math.sqrt(n))


def _epochs(steps: list[dict]) -> list[list[dict]]:
    return [[s for s in steps if s["epoch"] == e] for e in sorted({s["epoch"] for s in steps})]


def variant_figures(runs: list[dict], rows: int) -> dict:
    """One variant's figures from its runs (repeats): totals over all runs (tokens / seconds, not a mean of rates)."""
    epochs = len(_epochs(runs[0]["steps"]))
    tokens = sum(r["tokens_per_epoch"] * epochs for r in runs)
    step_seconds = sum(s["seconds"] for r in runs for s in r["steps"])
    step_cpu_seconds = sum(s["cpu_seconds"] for r in runs for s in r["steps"])
    run_seconds = sum(r["run_seconds"] for r in runs)
    per_epoch = []
    for e in range(epochs):
        seconds = sum(s["seconds"] for r in runs for s in _epochs(r["steps"])[e])
        losses = [s["loss"] for s in _epochs(runs[0]["steps"])[e]]
        per_epoch.append({
            "steps": len(losses), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(r["tokens_per_epoch"] for r in runs) / seconds, 1),
            "mean_loss": round(sum(losses) / len(losses), 5), "loss_se": round(epoch_noise(losses), 5),
        })  # fmt: skip
    figures = {
        "repeats": len(runs),
        "tokens_per_epoch": runs[0]["tokens_per_epoch"],
        "dataset_rows": runs[0]["dataset_rows"],
        "steps": len(runs[0]["steps"]),
        "step_seconds": round(step_seconds, 3),
        "tokens_per_s": round(tokens / step_seconds, 1),
        "samples_per_s": round(rows * epochs * len(runs) / step_seconds, 3),
        # per CPU-second of the training process (all its threads): the figure to read on a shared machine
        "tokens_per_cpu_s": round(tokens / step_cpu_seconds, 1),
        "end_to_end_tokens_per_s": round(tokens / run_seconds, 1),
        "before_training_seconds": [r["before_training_seconds"] for r in runs],
        "run_seconds": [r["run_seconds"] for r in runs],
        "epochs": per_epoch,
        "losses": [round(s["loss"], 5) for s in runs[0]["steps"]],
        # the same variant's repeats train the same batches: what kernels alone move the loss by
        "loss_spread_over_repeats": round(
            max(abs(a["loss"] - b["loss"]) for r in runs for a, b in zip(runs[0]["steps"], r["steps"])), 6
        ),
        "plugin_loaded": runs[0]["plugin_loaded"],
        "packed": runs[0]["packed"],
        "image_cache_on": runs[0]["image_cache_on"],
        "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
    }
    if "image_cache_counts" in runs[0]:
        figures["image_cache_counts"] = runs[0]["image_cache_counts"]
    if "peak_gpu_gib" in runs[0]:
        figures["peak_gpu_gib"] = max(r["peak_gpu_gib"] for r in runs)
    return figures


def compare_with_stock(figures: dict, stock: dict) -> dict:
    """Ratios over stock and the equal-loss verdict (see the module docstring)."""
    epochs = []
    for ours, base in zip(figures["epochs"], stock["epochs"], strict=True):
        bound = 2 * math.sqrt(ours["loss_se"] ** 2 + base["loss_se"] ** 2)
        diff = abs(ours["mean_loss"] - base["mean_loss"])
        epochs.append({"mean_loss_diff": round(diff, 5), "noise_bound": round(bound, 5), "within": diff <= bound})
    same_batches = figures["dataset_rows"] == stock["dataset_rows"] and not figures["packed"]  # else other groupings
    return {
        "ratio_tokens_per_s": round(figures["tokens_per_s"] / stock["tokens_per_s"], 3),
        "ratio_tokens_per_cpu_s": round(figures["tokens_per_cpu_s"] / stock["tokens_per_cpu_s"], 3),
        "ratio_end_to_end": round(figures["end_to_end_tokens_per_s"] / stock["end_to_end_tokens_per_s"], 3),
        "epoch_loss_vs_stock": epochs,
        "max_epoch_mean_loss_diff": max(e["mean_loss_diff"] for e in epochs),
        "equal_loss_curve": all(e["within"] for e in epochs),
        "max_step_loss_diff": (
            round(max(abs(a - b) for a, b in zip(figures["losses"], stock["losses"])), 6) if same_batches else None
        ),
    }


# ---------------------------------------------------------------------------------------------- driver


def prepare(
    work: Path, rows: int, small: bool, device: str, image_sizes: tuple[str, ...]
) -> tuple[Path, Path, list[int]]:
    """Model, rows (ours + the stock twin) and each row's token count (ours, fast tokenization, unpacked)."""
    model_dir = work / "model"
    write_model(ARCH, model_dir, small, device, torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda":  # the workers load it themselves: give back what this process's allocator still holds
        torch.cuda.empty_cache()
    data_dir = work / "data"
    write_rows(data_dir, n=rows, size_classes=image_sizes, seed=1)
    write_stock_twin(data_dir, FAMILY, model_dir)
    *_, dataset, _ = tokenize(model_dir, data_dir, work / "count", FAMILY, "ours", "lora", "cpu")
    return model_dir, data_dir, [len(ids) for ids in dataset["input_ids"]]


def run(work: Path, args: argparse.Namespace) -> dict:
    model_dir, data_dir, lengths = prepare(work, args.rows, args.small, args.device, tuple(args.image_sizes))
    cutoff = pack_cutoff(lengths, args.batch_size)
    skipped = {s: why for s in SWITCHES if (why := unavailable(s, args.device))}  # also left out of ``all``
    overrides = variant_overrides({s: o for s, o in SWITCHES.items() if s not in skipped})
    names = [n for n in args.variants or overrides if n in overrides]
    if names[0] != "stock":
        raise ValueError(f"--variants must start with stock (the baseline), got {names}")
    configs = {
        name: run_config(overrides[name], model_dir=model_dir, data_dir=data_dir, out=work / "runs" / name,
                         device=args.device, batch_size=args.batch_size, epochs=args.epochs, pack_cutoff=cutoff,
                         learning_rate=args.learning_rate)
        for name in names
    }  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in names}
    order = []
    for name, repeat, _ in interleaved_schedule(tuple(names), warmup=0, steps=args.repeats):
        spec = work / f"{name}-{repeat}.json"
        spec.write_text(json.dumps(configs[name]))
        # stock runs the host alone: our import hook is switched off in its process
        env = {**os.environ, DISABLE_ENV: "1"} if name == "stock" else os.environ
        subprocess.run([sys.executable, __file__, "--worker", str(spec)], check=True, env=env)
        result = json.loads(spec.with_suffix(".result.json").read_text())
        if result["tokens_per_epoch"] != sum(lengths):
            raise AssertionError(f"{name} trained {result['tokens_per_epoch']} tokens an epoch, not {sum(lengths)}")
        runs[name].append(result)
        order.append(name)
        print(json.dumps({"variant": name, "repeat": repeat, "train_seconds": result["train_seconds"]}),
              file=sys.stderr, flush=True)  # fmt: skip
    variants = {name: variant_figures(runs[name], args.rows) for name in names}
    for name in names:
        variants[name]["config"] = {k: configs[name][k] for k in sorted(configs[name]) if k not in
                                    ("model_name_or_path", "dataset_dir", "output_dir")}  # fmt: skip
        if name != "stock":
            variants[name].update(compare_with_stock(variants[name], variants["stock"]))
    return {
        "arch": ARCH, "rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size,
        "pack_cutoff_len": cutoff, "row_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_per_epoch": sum(lengths), "process_order": order, "skipped": skipped, "variants": variants,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="scaled-down model and rows: the code path on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="rows per epoch (default 400; 16 with --small)")
    parser.add_argument("--epochs", type=int, default=None, help="whole epochs (>= 2: the cache serves from epoch 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per unpacked step (default 8; 4 small)")
    parser.add_argument(
        "--image-sizes",
        type=lambda s: s.split(","),
        default=["normal", "big"],
        help="synth size classes, cycled over the rows (default: COCO-like, half above 768*768)",
    )
    parser.add_argument("--learning-rate", type=float, default=1.0e-4, help="the same for every variant")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every variant, in rotating order")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help="comma-separated, stock first (default: stock, ours, every switch, all)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one run: its config JSON
    args = parser.parse_args(argv)

    _bootstrap.install()  # the .pth does this where the package is pip-installed; idempotent (off if disabled)
    if args.worker:
        result = run_variant(json.loads(args.worker.read_text()))
        args.worker.with_suffix(".result.json").write_text(json.dumps(result))
        return result
    if args.device == "cpu" and not args.small:
        parser.error("real-size training on a CPU would take hours: add --small, or run on a GPU")
    args.rows = args.rows or (16 if args.small else 400)
    args.epochs = args.epochs or (3 if args.small else 2)
    args.batch_size = args.batch_size or (4 if args.small else 8)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the image cache serves from the second epoch on")
    result = {
        "benchmark": "fast_path",
        "small": args.small,
        **run_info(args.device),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        result.update(run(Path(tmp), args))
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
