"""What the offline demos (``llamafactory-vision demo``, grounding and ``--task edit``) share: the output folder,
``llamafactory-cli`` runs with their whole output in a log and their progress on the terminal, resolved YAML
copies and the eval scripts under ``eval/``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO_YAMLS = REPO / "yaml_examples" / "demo"

# A tqdm bar as the host prints it: "Running tokenizer on dataset (num_proc=2):  40%|####  | 1440/3600 [00:02<00:03]"
# (the training bar has no description); and the host's loss log lines: "{'loss': 1.2345, ...}".
_PROGRESS = re.compile(r"(?:(?P<desc>[^\r\n:|]+): *)?\d+%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) \[(?P<time>[^\],]*)")
_LOSS = re.compile(r"'loss': '?(?P<loss>[0-9.]+)")


class _Progress:
    """One short status line per progress step on the terminal, while the whole output goes to the log: without it,
    ~10 minutes of training on 2 cores show nothing. On a terminal the line is rewritten in place; otherwise (a pipe,
    a CI log) a line is printed at every tenth of each bar."""

    def __init__(self, stream):
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


def prepare_out(out_dir: str) -> tuple[Path, Path]:
    """The demo's output folder as an absolute path (commands run from the repository root) and its ``logs/``
    folder, created."""
    out = Path(out_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return out, logs


def run_logged(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its whole output in ``log`` and its progress bars summarised on the terminal."""
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    progress = _Progress(sys.stdout)  # the stdout of now, not of import time (pytest swaps it)
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


def dotlist(values: Mapping[str, Any]) -> list[str]:
    """OmegaConf ``key=value`` overrides, as ``llamafactory-cli train x.yaml key=value ...`` takes them."""
    return [f"{key}={value}" for key, value in values.items()]


def cli_train(config: Path | str, overrides: Mapping[str, Any], log: Path) -> None:
    """``llamafactory-cli train config key=value ...`` (the venv's own command) through :func:`run_logged`."""
    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    run_logged([cli, "train", str(config), *dotlist(overrides)], log)


def write_resolved(src: Path, dst: Path, overrides: Mapping[str, Any]) -> None:
    """Write ``src`` with ``overrides`` applied to ``dst``: one YAML that both ``llamafactory-cli`` and our own
    commands (preview, the demo's untrained parts) read."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.load(src), OmegaConf.from_dotlist(dotlist(overrides)))
    dst.write_text(OmegaConf.to_yaml(merged))


def run_eval(script: str, args: list[str], metrics_path: Path, log: Path) -> dict[str, Any]:
    """``python eval/<script> <args> --out metrics_path`` through :func:`run_logged`; returns the metrics it wrote."""
    run_logged([sys.executable, str(REPO / "eval" / script), *args, "--out", str(metrics_path)], log)
    return json.loads(metrics_path.read_text())
