"""Shared fixtures: tiny offline models, synthetic grounding data, and a runner for the real CLIs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
GROUND_TEMPLATE = {"qwen2_vl": "qwen2_vl_ground", "qwen2_5_vl": "qwen2_5_vl_ground", "qwen3_vl": "qwen3_vl_ground"}
STOCK_TEMPLATE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl_nothink"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: thread start-up and contention cost more than they save
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # llamafactory-cli starts `torchrun` from PATH
    env.pop("LLAMAFACTORY_VISION_DISABLE", None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run one of the venv's console scripts (``llamafactory-cli``, ``llamafactory-vision``) or python."""
    exe = args[0] if args[0] == sys.executable else str(BIN / args[0])
    result = subprocess.run(
        [exe, *args[1:]], cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=900, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


class LogLines(logging.Handler):
    """Keeps the messages of the records it receives at ``level`` or above."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread inside the block, as ``OMP_NUM_THREADS=1`` (``cli_env``) runs the CLI processes: float sums
    over another thread count differ in the last bits, and a test compared with a CLI run must match it exactly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_process(config: dict) -> list[str]:
    """``llamafactory-cli train`` on ``config`` inside this process: ``run_exp``, the function the CLI calls, with one
    torch thread as the CLI runs get (``cli_env``). It saves a CLI's start-up (~10 s of CPU importing torch,
    transformers and the host) where the process a run takes place in does not matter, e.g. the 1-process oracle of a
    2-process run. Returns the messages logged under the host's library logger (``llamafactory.*``: the host's lines
    and ours) at INFO and above."""
    from llamafactory.train.tuner import run_exp

    handler, library = LogLines(), logging.getLogger("llamafactory")
    library.addHandler(handler)
    try:
        with one_torch_thread():
            run_exp({k: str(v) if isinstance(v, Path) else v for k, v in config.items()})
    finally:
        library.removeHandler(handler)
    return handler.lines


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in config.items()}))
    return path


def train_config(model: Path, data_dir: Path, out: Path, template: str, **extra) -> dict:
    """A minimal LoRA SFT config for the tiny models (a few steps, CPU)."""
    return {
        "model_name_or_path": model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset": "synth_ground_train",
        "dataset_dir": data_dir,
        "template": template,
        "cutoff_len": 512,
        "output_dir": out,
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **extra,
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from llamafactory_vision.tiny import build_tiny

    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny(family, root / family, seed=0) for family in (*QWEN_FAMILIES, "llava")}


@pytest.fixture(scope="session")
def varied_data(tmp_path_factory) -> Path:
    """Synthetic grounding set with tiny, very wide, very tall and larger-than-max_pixels images."""
    from llamafactory_vision.synth import generate_grounding

    root = tmp_path_factory.mktemp("varied")
    generate_grounding(root, n=40, seed=1, val_frac=0.25, preset="varied")
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from llamafactory_vision.synth import generate_grounding

    root = tmp_path_factory.mktemp("demo")
    generate_grounding(root, n=12, seed=2, val_frac=0.34, preset="demo")
    return root


def tokenized_rows(model_dir: Path, data_dir: Path, out: Path, template: str, stage: str, cutoff_len: int, **extra):
    """The ``synth_ground_train`` split of ``data_dir`` through the host's ``get_dataset`` (SFT LoRA arguments plus
    ``extra``) for ``stage``: its rows as dicts, the template and the tokenizer module."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "synth_ground_train", "dataset_dir": str(data_dir), "template": template,
            "cutoff_len": cutoff_len, "output_dir": str(out), "overwrite_output_dir": True, "overwrite_cache": True,
            "report_to": "none", **extra,
        }
    )  # fmt: skip
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_obj, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    return list(dataset["train_dataset"]), template_obj, tokenizer_module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- editing (stage: edit) ---------------------------------------------------------------------------------------

# A small edit head keeps the tiny runs fast; the MGIE size (512, 4 + 4 layers, FF 2048) is the default.
EDIT_HEAD = {"edit_head_width": 32, "edit_head_layers": 1, "edit_head_ffn": 64}


@pytest.fixture(scope="session")
def edit_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaVA-1.5, an 8-channel (InstructPix2Pix-like) and a 4-channel (SD-1.5-like) diffusion folder, CLIP."""
    from llamafactory_vision.tiny import build_tiny, build_tiny_clip, build_tiny_diffusion

    root = tmp_path_factory.mktemp("edit_models")
    return {
        "llava": build_tiny("llava", root / "llava", seed=0),
        "ip2p": build_tiny_diffusion(root / "ip2p", seed=0),
        "sd15": build_tiny_diffusion(root / "sd15", seed=0, in_channels=4),
        "clip": build_tiny_clip(root / "clip", seed=0),
    }


@pytest.fixture(scope="session")
def edit_data(tmp_path_factory) -> Path:
    from llamafactory_vision.synth import generate_edit

    root = tmp_path_factory.mktemp("edit_data")
    generate_edit(root, n=16, seed=0, val_frac=0.25)
    return root


def edit_config(models: dict[str, Path], data_dir: Path, out: Path, **extra) -> dict:
    """A minimal LoRA `stage: edit` config on the tiny models (32 px, a few steps, CPU)."""
    return {
        **train_config(models["llava"], data_dir, out, "llava_edit"),
        "stage": "edit",
        "dataset": "synth_edit_train",
        "cutoff_len": 256,
        "diffusion_model_name_or_path": models["ip2p"],
        "edit_resolution": 32,
        **EDIT_HEAD,
        **extra,
    }
