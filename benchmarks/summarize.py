"""Collect benchmark results: pull the JSON out of a run's stdout, print the ratio table, plot the ratios.

    python benchmarks/summarize.py extract run.out > run.json      # the last JSON object printed on stdout
    python benchmarks/summarize.py table RESULTS_DIR               # one line per figure (gpu_all.sh prints this)
    python benchmarks/summarize.py plot RESULTS_DIR --png ratios.png

A benchmark script prints its result as the last JSON object on stdout (LLaMA-Factory logs to stdout too, so the
object is found from the end). ``table`` and ``plot`` read ``a.json``, ``b.json`` and ``cpu.json`` from
``bench_grounding.py`` and ``fast_path.json`` from ``bench_fast_path.py``, and list any other ``*.json`` (edit,
mg_llava, zero3) by name with its top-level numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Marks runs of the first harness, which timed stock, ours, ours + head one after another: the first variant timed
# paid ~40% of warm-up on an H200, so their ratios are biased by the order (drawn grey, never read as a result).
SEQUENTIAL = "[sequential: order-biased]"


def extract_last_json(text: str) -> dict:
    """The last top-level JSON object in ``text`` (one that starts at the beginning of a line)."""
    decoder = json.JSONDecoder()
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON object found at the start of any line")


def rows(results: Path) -> list[tuple[str, str, float | None]]:
    """``(figure, value text, ratio or None)`` for every figure in ``results``."""
    out: list[tuple[str, str, float | None]] = []
    for workload in ("a", "b"):
        path = results / f"{workload}.json"
        if not path.is_file():
            continue
        for run in json.loads(path.read_text())["runs"]:
            v = run["variants"]
            label = f"{run['arch']} {run['mode']}"
            if run.get("schedule") != "interleaved":  # the first harness timed the variants one after another
                label += f" {SEQUENTIAL}"
            mfu, collate = v["stock"].get("mfu"), v["stock"].get("collate_share")
            text = f"stock {v['stock']['samples_per_s']} samples/s, {v['stock']['tokens_per_s']} tok/s" + (
                f", {v['stock']['peak_gib']} GiB, MFU {mfu:.1%}" if mfu is not None else ""
            )
            if collate is not None:  # since 2026-12-01: the share of a step spent collating on the host CPU
                text += f", collate {collate:.0%}"
            if "kernel_ops_per_step" in v["stock"]:  # since 2026-12-01: what a launch-bound step costs the host
                text += f", {v['stock']['kernel_ops_per_step']:,} kernel ops/step"
            out.append((f"{label}: stock", text, None))
            out.append((f"{label}: ours/stock", f"{v['ours']['tokens_per_s']} tok/s", run["ratio_ours_over_stock"]))
            out.append((f"{label}: ours+head/stock", f"{v['ours_head']['tokens_per_s']} tok/s",
                        run["ratio_head_over_stock"]))  # fmt: skip
    path = results / "cpu.json"
    if path.is_file():
        cpu = json.loads(path.read_text())
        prep = cpu["prep"]

        def rate(key: str) -> str:  # wall-clock rate (and the CPU-time rate, the one to trust on a shared machine)
            return f"{prep[f'{key}_rows_per_s']} rows/s (per CPU-s: {prep.get(f'{key}_rows_per_cpu_s')})"

        def ratio(key: str) -> float:  # by CPU time where measured: wall time on a shared machine is noise
            return prep.get(f"ratio_{key}_over_stock_cpu", prep[f"ratio_{key}_over_stock"])

        out.append(("prep: stock", rate("stock"), None))
        out.append(("prep: ours (host image path)/stock", rate("ours_host_path"), ratio("ours_host_path")))
        out.append(("prep: ours fast/stock", rate("ours_fast"), ratio("ours_fast")))
        convert, ground_eval = cpu["convert"], cpu["ground_eval"]
        convert_text = f"{convert['objects_per_s']} objects/s (per CPU-s: {convert.get('objects_per_cpu_s')})"
        out.append(("COCO conversion", convert_text, None))
        eval_text = (
            f"{ground_eval['predictions_per_s']} predictions/s (per CPU-s: {ground_eval.get('predictions_per_cpu_s')})"
        )
        out.append(("ground_eval", eval_text, None))
    path = results / "fast_path.json"
    if path.is_file():  # bench_fast_path.py: whole runs, stock vs each switch alone and all on
        fast = json.loads(path.read_text())
        for name, v in fast["variants"].items():
            text = (
                f"{v['tokens_per_s']} tok/s, {v['samples_per_s']} samples/s, end to end {v['end_to_end_tokens_per_s']}"
            )
            if name != "stock":
                text += f", equal loss: {v['equal_loss_curve']}"
            out.append((f"fast path ({v['steps']} steps): {name}" + ("" if name == "stock" else "/stock"),
                        text, v.get("ratio_tokens_per_s")))  # fmt: skip
    for path in sorted(results.glob("*.json")):
        if path.stem in ("a", "b", "cpu", "fast_path"):
            continue
        data = json.loads(path.read_text())
        numbers = {k: v for k, v in data.items() if isinstance(v, (int, float, bool))}
        out.append((path.stem, json.dumps(numbers)[:200], None))
    return out


def plot(results_dirs: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, colours = [], [], []
    for results in results_dirs:
        # --small runs prove the code path; on a shared CPU their speed ratios are noise: drawn grey.
        small = any(json.loads(path.read_text()).get("small") for path in results.glob("*.json"))
        for name, _, ratio in rows(results):
            if ratio is not None:
                suffix = f" [{results.name}{', --small: path only' if small else ''}]" if len(results_dirs) > 1 else ""
                labels.append(name + suffix)
                ratios.append(ratio)
                biased = small or SEQUENTIAL in name
                colours.append("lightgrey" if biased else "tab:green" if ratio >= 0.98 else "tab:red")
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(0.98, color="grey", linestyle="--", linewidth=1, label="target 0.98x (head off)")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ours / stock (log scale; > 1 is faster)")
    for i, ratio in enumerate(ratios):
        ax.text(ratio, i, f" {ratio:.3g}x", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("extract").add_argument("stdout_file", type=Path)
    commands.add_parser("table").add_argument("results", type=Path)
    plot_parser = commands.add_parser("plot")
    plot_parser.add_argument("results", type=Path, nargs="+")
    plot_parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "extract":
        print(json.dumps(extract_last_json(args.stdout_file.read_text()), indent=2))
    elif args.command == "table":
        for name, value, ratio in rows(args.results):
            print(f"{name:<42} {value:<70} {'' if ratio is None else f'{ratio:.3f}x'}")
    else:
        plot(args.results, args.png)


if __name__ == "__main__":
    sys.exit(main())
