"""The benchmark harness's own pieces: real-size configs (parameter counts of the published checkpoints), the model
FLOP count, and pulling the result JSON out of a run's log-filled stdout."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from arch import model_config
from bench_grounding import FlopModel
from summarize import extract_last_json

# Total parameters of the published checkpoints (safetensors metadata of the Hugging Face repositories).
PUBLISHED = {"qwen2vl-2b": 2_208_985_600, "qwen2.5vl-3b": 3_754_622_976, "qwen3vl-2b": 2_127_532_032}
FAMILY = {"qwen2vl-2b": "qwen2_vl", "qwen2.5vl-3b": "qwen2_5_vl", "qwen3vl-2b": "qwen3_vl"}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_real_size_configs_have_the_published_parameter_count(arch):
    from llamafactory_vision.tiny.vlm import RECIPES
    from transformers import AutoModelForImageTextToText

    config = model_config(arch, small=False, tokenizer=RECIPES[FAMILY[arch]].tokenizer())
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[arch]


def test_step_flops_by_hand():
    flops = FlopModel(llm_linear=1000, llm_attention=10, vision_linear=100, vision_attention=2)
    lengths, patches = torch.tensor([3, 5]), torch.tensor([4])
    llm_forward = 2 * 1000 * 8 + 4 * 10 * (9 + 25)  # 17,360
    vision_forward = 2 * 100 * 4 + 4 * 2 * 16  # 928
    assert flops.step_flops(lengths, patches, lora=False) == 3 * llm_forward + vision_forward
    assert flops.step_flops(lengths, patches, lora=True) == 2 * llm_forward + vision_forward


def test_extract_last_json_skips_logs_and_earlier_objects():
    text = '[INFO] start\n{"partial": 1}\nlog {not json}\n{\n  "runs": [{"a": 1}],\n  "ok": true\n}\n[INFO] bye\n'
    assert extract_last_json(text) == {"runs": [{"a": 1}], "ok": True}
    with pytest.raises(ValueError):
        extract_last_json("no json here\n")


# ---------------------------------------------------------------------------------------------- interleaved timing


def test_schedule_interleaves_after_a_shared_warmup_and_rotates_the_order():
    from bench_grounding import interleaved_schedule

    schedule = interleaved_schedule(("s", "o", "h"), warmup=2, steps=3)
    # warm-up: every variant steps batch 0, then batch 1, untimed; then one step each per round, the order rotating
    assert schedule == [
        ("s", 0, False), ("o", 0, False), ("h", 0, False),
        ("s", 1, False), ("o", 1, False), ("h", 1, False),
        ("s", 2, True), ("o", 2, True), ("h", 2, True),
        ("o", 3, True), ("h", 3, True), ("s", 3, True),
        ("h", 4, True), ("s", 4, True), ("o", 4, True),
    ]  # fmt: skip
    timed = [v for v, _, is_timed in interleaved_schedule(("s", "o", "h"), warmup=3, steps=9) if is_timed]
    for position in range(3):  # each variant first, second and third in equally many rounds
        firsts = [timed[r * 3 + position] for r in range(9)]
        assert sorted(firsts) == sorted(["s", "o", "h"] * 3)


def test_time_interleaved_calls_the_steppers_in_schedule_order_and_ratios_come_from_totals():
    from bench_grounding import StepTiming, ratio_of_totals, time_interleaved, variant_figures

    calls = []
    # stock: one slow step and one fast one (200 tokens in 1.1 s); ours: two equal ones (200 tokens in 1.0 s). A mean
    # of per-step rates (stock (100 + 1000) / 2 = 550 tokens/s, ours 200) would call ours 0.36x; totals say 1.1x.
    plan = {"stock": [(1.0, 100), (0.1, 100)], "ours": [(0.5, 100), (0.5, 100)], "ours_head": [(1.0, 100), (1.0, 100)]}

    def stepper(variant):
        def step(index):
            calls.append((variant, index))
            seconds, tokens = plan[variant][index - 1] if index >= 1 else (9.0, 1)  # index 0: the warm-up
            return StepTiming(seconds, tokens, flops=0.0, loss=float(index), collate_seconds=seconds / 4)

        return step

    timed, order = time_interleaved({v: stepper(v) for v in plan}, warmup=1, steps=2)
    assert calls == [("stock", 0), ("ours", 0), ("ours_head", 0), ("stock", 1), ("ours", 1), ("ours_head", 1),
                     ("ours", 2), ("ours_head", 2), ("stock", 2)]  # fmt: skip
    assert order == ["stock", "ours", "ours_head", "ours", "ours_head", "stock"]
    assert [t.loss for t in timed["stock"]] == [1.0, 2.0]  # warm-up steps are not kept
    # stock: 200 tokens in 1.1 s; ours: 200 tokens in 1.0 s; head: 200 in 2.0 s
    assert ratio_of_totals(timed["ours"], timed["stock"]) == pytest.approx(1.1, abs=1e-4)
    assert ratio_of_totals(timed["ours_head"], timed["stock"]) == pytest.approx(0.55, abs=1e-4)
    figures = variant_figures(timed["stock"], batch_size=4, peak_tflops=1.0, device="cpu", resident_bytes=0)
    assert figures["tokens_per_s"] == pytest.approx(200 / 1.1, abs=0.1)
    assert figures["samples_per_s"] == pytest.approx(8 / 1.1, abs=1e-3)
    assert figures["losses"] == [1.0, 2.0]
    # collation: a quarter of each step, 0.275 s of 1.1 s over two steps
    assert figures["collate_s_per_step"] == pytest.approx(0.1375, abs=1e-4)
    assert figures["collate_share"] == pytest.approx(0.25, abs=1e-4)


def test_small_training_run_interleaves_the_real_variants(tmp_path, monkeypatch):
    """The --small code path end to end (one run): real variants through the host's data and model loading, the
    timed steps in rotating order, and stock and ours on identical tokens (equal losses)."""
    import argparse

    import bench_grounding

    monkeypatch.setitem(bench_grounding.WORKLOADS, "a", [("qwen2vl-2b", "lora")])
    args = argparse.Namespace(batch_size=2, warmup=1, steps=3, peak_tflops=1.0)
    with torch.random.fork_rng(devices=[]):
        (run,) = bench_grounding.run_training("a", True, "cpu", tmp_path, args, save=lambda partial: None)["runs"]
    assert run["timed_order"] == ["stock", "ours", "ours_head", "ours", "ours_head", "stock",
                                  "ours_head", "stock", "ours"]  # fmt: skip
    variants = run["variants"]
    assert all(len(v["losses"]) == 3 for v in variants.values())
    assert run["max_loss_diff_ours_vs_stock"] == 0.0
    stock, ours = variants["stock"], variants["ours"]
    assert run["ratio_ours_over_stock"] == pytest.approx(
        (ours["tokens"] / ours["seconds"]) / (stock["tokens"] / stock["seconds"]), rel=1e-3
    )
    # where the time went: collation is part of each step; the rounds hold every variant's timed steps and the
    # warm-up; the run holds the model writing, the builds and the rounds
    for v in variants.values():
        assert 0 < v["collate_s_per_step"] < v["s_per_step"] and 0 < v["collate_share"] < 1
        assert v["build_s"] > 0
        assert 0 < v["kernel_ops_per_step"] < v["ops_per_step"]
    # our template and collator leave the model's step op for op as stock's; the head adds its own ops
    assert variants["ours"]["ops_per_step"] == stock["ops_per_step"]
    assert variants["ours_head"]["ops_per_step"] > stock["ops_per_step"]
    phases = run["phases"]
    assert phases["rounds_s"] >= sum(v["seconds"] for v in variants.values())
    builds = sum(v["build_s"] for v in variants.values())
    assert phases["run_s"] >= phases["write_model_s"] + builds + phases["rounds_s"] - 0.3  # each rounded to 0.1 s


def test_summary_marks_runs_of_the_sequential_harness(tmp_path):
    import json

    from summarize import SEQUENTIAL, rows

    variant = {"samples_per_s": 1.0, "tokens_per_s": 10.0}
    run = {"arch": "x", "mode": "lora", "variants": {"stock": variant, "ours": variant, "ours_head": variant},
           "ratio_ours_over_stock": 2.0, "ratio_head_over_stock": 1.5}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps({"runs": [run, {**run, "arch": "y", "schedule": "interleaved"}]}))
    ratios = {name: ratio for name, _, ratio in rows(tmp_path) if ratio is not None}
    assert ratios == {
        f"x lora {SEQUENTIAL}: ours/stock": 2.0, f"x lora {SEQUENTIAL}: ours+head/stock": 1.5,
        "y lora: ours/stock": 2.0, "y lora: ours+head/stock": 1.5,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- fused head loss


def test_head_loss_benchmark_times_equal_work_interleaved(tmp_path):
    """bench_head_loss.py's --small path: both measures, fused and unfused checked equal before timing (the loss values
    bit for bit: the fused forward repeats the unfused arithmetic), and figures from the interleaved timed steps."""
    import json

    import bench_head_loss

    with torch.random.fork_rng(devices=[]):
        result = bench_head_loss.main(["--small", "--devices", "cpu", "--warmup", "1", "--steps", "2", "--step-ms", "1",
                                       "--out", str(tmp_path / "head_loss.json")])  # fmt: skip
    assert json.loads((tmp_path / "head_loss.json").read_text()) == result
    runs = {(r["measure"], r["boxes"]): r for r in result["runs"]}
    assert set(runs) == {(m, n) for m in ("loss", "head") for n in bench_head_loss.SMALL_BOX_COUNTS}
    for (measure, _), run in runs.items():
        if measure == "loss":
            assert run["max_abs_diff_total"] == 0.0
        assert run["max_abs_diff_grad"] < 1e-4
        assert run["unfused_us_per_call"] > 0 and run["fused_us_per_call"] > 0
        assert run["speedup_fused_over_unfused"] == pytest.approx(
            run["unfused_us_per_call"] / run["fused_us_per_call"], rel=1e-2
        )


def test_head_loss_benchmark_refuses_unequal_work():
    import bench_head_loss

    calls, grads_of = bench_head_loss.callables("loss", 8, 16, "cpu")
    unfused = calls["unfused"]
    with pytest.raises(AssertionError, match="fused and unfused differ"):
        bench_head_loss.check_equal({"unfused": unfused, "fused": lambda: unfused() * 1.01}, grads_of, "loss")


# ---------------------------------------------------------------------------------------------- fast path (whole runs)


def test_fast_path_counts_tokens_and_loss_noise_by_hand():
    import numpy as np
    from bench_fast_path import SWITCHES, epoch_noise, pack_cutoff, real_tokens, variant_overrides

    # an unpacked row is all ones; a neat pack numbers its rows 1..k and pads with 0: 3 + 5 real tokens
    assert real_tokens({"attention_mask": [[1, 1, 1], [1, 1, 2, 2, 2, 0, 0]]}) == 8
    losses = [2.0, 1.7, 1.75, 1.4, 1.42, 1.1]
    x = np.arange(len(losses))
    residual = np.asarray(losses) - np.polyval(np.polyfit(x, losses, 1), x)  # numpy's least squares, the oracle
    assert epoch_noise(losses) == pytest.approx(np.sqrt((residual**2).sum() / 4) / np.sqrt(6), rel=1e-9)
    # packing length: 6 rows in 3 batches of 2; from 60 (2 mean rows, the longest row) to 64 the host's packer makes 4
    # packs ([60], [50, 10], [50, 10], [10]); at 72 (70 is no multiple of 8) 3 ([60, 10], [50, 10, 10], [50])
    assert pack_cutoff([60, 10, 50, 10, 50, 10], batch_size=2) == 72
    # one more switch is one more ablation row, and `all` turns it on too
    table = variant_overrides({**SWITCHES, "fused": {"bbox_fused_loss": True}})
    assert table["stock"] is None and table["ours"] == {}
    assert table["fused"] == {"bbox_fused_loss": True} and table["all"]["bbox_fused_loss"] is True
    assert list(table) == ["stock", "ours", *SWITCHES, "fused", "all"]


@pytest.mark.e2e
def test_fast_path_small_run_trains_stock_without_switches_and_ours_with_them(tmp_path):
    """--small end to end, two processes: stock runs the host with our hook off, on the stock template, unpacked and
    uncached; `all` packs, serves epoch 2 from the image cache, and counts the same tokens."""
    import json

    import bench_fast_path

    out = tmp_path / "fast_path.json"
    bench_fast_path.main(["--small", "--rows", "4", "--epochs", "2", "--batch-size", "2", "--image-sizes", "tiny",
                          "--variants", "stock,all", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    stock, ours = result["variants"]["stock"], result["variants"]["all"]
    assert result["process_order"] == ["stock", "all"]
    assert stock["config"]["template"] == "qwen2_vl" and stock["config"]["dataset"] == "stock"
    assert not set(stock["config"]) & {k for o in bench_fast_path.SWITCHES.values() for k in o}
    assert (stock["plugin_loaded"], stock["packed"], stock["image_cache_on"]) == (False, False, False)
    assert (ours["plugin_loaded"], ours["packed"], ours["image_cache_on"]) == (True, True, True)
    assert ours["image_cache_counts"]["misses"] == 4 and ours["image_cache_counts"]["hits"] == 4  # epoch 2: cached
    assert stock["tokens_per_epoch"] == ours["tokens_per_epoch"] == result["tokens_per_epoch"]
    assert ours["dataset_rows"] < 4  # packs
    for figures in (stock, ours):
        assert len(figures["losses"]) == figures["steps"] and len(figures["epochs"]) == 2
        assert figures["tokens_per_s"] > 0 and figures["end_to_end_tokens_per_s"] < figures["tokens_per_s"]
    assert {"ratio_tokens_per_s", "ratio_end_to_end", "equal_loss_curve", "epoch_loss_vs_stock"} <= set(ours)
