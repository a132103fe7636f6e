"""The offline grounding demo behind ``make demo``.

Every step is what a user would run by hand; the YAMLs are in ``yaml_examples/demo/`` and use paths under
``out/demo`` (overridden on the command line when ``--out`` differs):

1. build a tiny random Qwen2-VL (``llamafactory_vision.tiny``) and a synthetic grounding set (``synth``);
2. ``llamafactory-vision preview`` the training data (target boxes drawn on the image the model sees);
3. ``llamafactory-cli train`` a predict run before training, the training run, a predict run after;
4. ``eval/ground_eval.py`` on both predictions (with pictures), then print the before/after table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from llamafactory_vision.grounding.bbox_head import BBoxHead, BBoxHeadConfig, save_head
from llamafactory_vision.grounding.preview import preview
from llamafactory_vision.synth import generate_grounding
from llamafactory_vision.tiny import build_tiny

REPO = Path(__file__).resolve().parents[2]
DEMO_YAMLS = REPO / "yaml_examples" / "demo"
DEFAULT_OUT = "out/demo"

# Sizes chosen so that training fits in a few minutes on 2 CPU cores (see README for the measured figures).
MODEL_SIZE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vision_hidden_size=64, vision_depth=2)
DEMO_ROWS = 4000  # 90% train, 10% val
SEED = 0


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# A tqdm bar as the host prints it: "Running tokenizer on dataset (num_proc=2):  40%|####  | 1440/3600 [00:02<00:03]"
# (the training bar has no description); and the host's loss log lines: "{'loss': 1.2345, ...}".
_PROGRESS = re.compile(r"(?:(?P<desc>[^\r\n:|]+): *)?\d+%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) \[(?P<time>[^\],]*)")
_LOSS = re.compile(r"'loss': '?(?P<loss>[0-9.]+)")


class _Progress:
    """One short status line per progress step on the terminal, while the whole output goes to the log: without it,
    ~10 minutes of training on 2 cores show nothing. On a terminal the line is rewritten in place; otherwise (a pipe,
    a CI log) a line is printed at every tenth of each bar."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.in_place = stream.isatty()
        self.loss: str | None = None
        self._printed: dict[str, int] = {}
        self._width = 0

    def feed(self, line: str) -> None:
        if match := _LOSS.search(line):
            self.loss = match.group("loss")
        match = _PROGRESS.search(line)
        if match is None:
            return
        desc = (match.group("desc") or "training steps").strip()
        n, total = int(match.group("n")), int(match.group("total"))
        tenth = 10 * n // max(total, 1)
        if not self.in_place and self._printed.get(desc) == tenth:
            return
        self._printed[desc] = tenth
        status = f"    {desc}: {n}/{total} [{match.group('time')}]" + (f" loss {self.loss}" if self.loss else "")
        if self.in_place:
            self.stream.write("\r" + status.ljust(self._width))
            self._width = len(status)
        else:
            self.stream.write(status + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.in_place and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its whole output in ``log`` and its progress bars summarised on the terminal."""
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    progress = _Progress()
    with open(log, "w") as f:
        # Text mode reads tqdm's "\r" refreshes as lines of their own, so each refresh reaches `progress` at once.
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True,
                              bufsize=1) as process:  # fmt: skip
            for line in process.stdout:
                f.write(line)
                progress.feed(line)
        progress.close()
    if process.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        message = f"command failed with exit code {process.returncode}; last lines of {log}:\n" + "\n".join(tail)
        raise RuntimeError(message)


def _overrides(out: Path, **extra: str) -> list[str]:
    """OmegaConf ``key=value`` overrides for ``llamafactory-cli train demo.yaml``: point the YAML at ``out``."""
    values = {"model_name_or_path": out / "models" / "qwen2_vl", "dataset_dir": out / "data", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _evaluate(predictions_dir: Path, data_dir: Path, model_dir: Path, vis_dir: Path) -> dict:
    metrics_path = predictions_dir / "ground_metrics.json"
    cmd = [
        sys.executable, str(REPO / "eval" / "ground_eval.py"),
        "--predictions", str(predictions_dir / "generated_predictions.jsonl"),
        "--out", str(metrics_path), "--family", "qwen2_vl",
        "--visualize", str(vis_dir), "--images", str(data_dir / "ground_val.jsonl"),
        "--dataset-dir", str(data_dir), "--model", str(model_dir),
    ]  # fmt: skip
    _run(cmd, predictions_dir / "ground_eval.log")
    return json.loads(metrics_path.read_text())


def run_demo(out_dir: str = DEFAULT_OUT, quick: bool = False) -> int:
    start = time.time()
    out = Path(out_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    print("1/5 building the tiny Qwen2-VL and the synthetic grounding set", flush=True)
    model_dir = build_tiny("qwen2_vl", out / "models" / "qwen2_vl", seed=SEED, **MODEL_SIZE)
    # The untrained model gets an untrained (zero-initialised) head, so "before" scores the head too.
    save_head(BBoxHead(BBoxHeadConfig(hidden_size=MODEL_SIZE["hidden_size"])), model_dir)
    data_dir = out / "data"
    generate_grounding(data_dir, n=100 if quick else DEMO_ROWS, seed=SEED, val_frac=0.1, preset="demo")

    print("2/5 preview: target boxes on the images as the model sees them", flush=True)
    train_yaml = DEMO_YAMLS / "qwen2vl_ground_train.yaml"
    preview_dir = out / "preview"
    train_extra = {"output_dir": out / "train"}
    if quick:
        train_extra["max_steps"] = 5
    # preview reads the same YAML as training; overrides are applied by writing a resolved copy
    resolved = out / "qwen2vl_ground_train.resolved.yaml"
    _write_resolved(train_yaml, resolved, _overrides(out, **train_extra))
    preview(str(resolved), str(preview_dir), n=8)

    predict_yaml = str(DEMO_YAMLS / "qwen2vl_ground_predict.yaml")
    print("3/5 predict before training", flush=True)
    before_dir = out / "predict_before"
    _run([_bin("llamafactory-cli"), "train", predict_yaml, *_overrides(out, output_dir=before_dir)],
         logs / "predict_before.log")  # fmt: skip

    print("4/5 training through llamafactory-cli", flush=True)
    t0 = time.time()
    _run([_bin("llamafactory-cli"), "train", str(resolved)], logs / "train.log")
    train_seconds = time.time() - t0

    print("5/5 predict after training and evaluate", flush=True)
    after_dir = out / "predict_after"
    trained = out / "train"
    _run([_bin("llamafactory-cli"), "train", predict_yaml,
          *_overrides(out, output_dir=after_dir, model_name_or_path=trained)], logs / "predict_after.log")  # fmt: skip

    before = _evaluate(before_dir, data_dir, model_dir, out / "vis_before")
    after = _evaluate(after_dir, data_dir, trained, out / "vis_after")
    _report(before, after, train_seconds, time.time() - start, out)
    return 0


def _write_resolved(src: Path, dst: Path, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.load(src), OmegaConf.from_dotlist(overrides))
    dst.write_text(OmegaConf.to_yaml(merged))


def _report(before: dict, after: dict, train_seconds: float, total_seconds: float, out: Path) -> None:
    rows = [
        ("text acc@0.5", "acc@0.5"), ("text acc@0.75", "acc@0.75"), ("text mIoU", "miou"),
        ("head acc@0.5", "head_acc@0.5"), ("head acc@0.75", "head_acc@0.75"), ("head mIoU", "head_miou"),
    ]  # fmt: skip
    print("\n== grounding demo: tiny Qwen2-VL on the synthetic val split ==")
    print(f"{'metric':<16}{'before':>10}{'after':>10}")
    def cell(metrics: dict, key: str) -> str:
        return f"{metrics[key]:>10.3f}" if key in metrics else f"{'-':>10}"  # no head boxes in that run

    for name, key in rows:
        print(f"{name:<16}{cell(before, key)}{cell(after, key)}")
    print(f"{'parse failures':<16}{before['parse_failures']:>10d}{after['parse_failures']:>10d}")
    print(f"label boxes: {after['n']}   training: {train_seconds:.0f} s   whole demo: {total_seconds:.0f} s")
    print(f"pictures: {out / 'preview'} (targets), {out / 'vis_before'} and {out / 'vis_after'} "
          "(green = label, red = text prediction, blue = bbox head)")  # fmt: skip
    print(f"metrics: {out / 'predict_after' / 'ground_metrics.json'}; LLaMA-Factory's own: "
          f"{out / 'predict_after' / 'predict_results.json'}")  # fmt: skip
