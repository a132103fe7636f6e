"""A hook that raises while LLaMA-Factory imports must leave stock LLaMA-Factory usable, say on stderr what was not
installed and why, and make our own templates and keys fail with that message (not with a puzzling host error)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STOCK_TEMPLATE, cli_env, read_jsonl, train_config, write_yaml
from test_autoload import _stock_dataset

pytestmark = pytest.mark.e2e

ERROR = "RuntimeError: deliberately broken hook"

# `llamafactory-cli train CONFIG` (the console script's own `main`) with one hook of HOOKS replaced by one that raises.
RUN_WITH_BROKEN_HOOK = """
import sys
import llamafactory_vision.patches as patches

module, name, config = sys.argv[1:]

def broken(host_module):
    raise RuntimeError("deliberately broken hook")

broken.__name__ = name
patches.HOOKS[module] = tuple(broken if hook.__name__ == name else hook for hook in patches.HOOKS[module])
sys.argv = ["llamafactory-cli", "train", config]
from llamafactory.cli import main
main()
"""


def _run(module: str, hook: str, config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", RUN_WITH_BROKEN_HOOK, module, hook, str(config)]
    return subprocess.run(
        command, cwd=config.parent, env=cli_env(), capture_output=True, text=True, timeout=600, check=False
    )


def _warning(module: str, hook: str) -> str:
    return f"WARNING llamafactory-vision: hook {hook} on {module} failed and was not installed ({ERROR})"


def _report(module: str, hook: str) -> str:
    return f"could not install part of itself into LLaMA-Factory ({hook} on {module} raised {ERROR})"


def test_stock_run_works_and_our_template_names_the_failed_hook(tmp_path, tiny_models, demo_data):
    module, hook = "llamafactory.data.template", "register_templates"
    images = [str(demo_data / r["images"][0]) for r in read_jsonl(demo_data / "ground_train.jsonl")][:2]
    stock = train_config(tiny_models["qwen2_vl"], _stock_dataset(tmp_path, images), tmp_path / "stock",
                         STOCK_TEMPLATE["qwen2_vl"], dataset="stock", max_steps=1)  # fmt: skip
    result = _run(module, hook, write_yaml(tmp_path / "stock.yaml", stock))
    assert result.returncode == 0, result.stderr[-4000:]
    assert _warning(module, hook) in result.stderr
    assert read_jsonl(tmp_path / "stock" / "trainer_log.jsonl")[0]["loss"] > 0

    ours = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path / "ours", "qwen2_vl_ground", max_steps=1)
    result = _run(module, hook, write_yaml(tmp_path / "ours.yaml", ours))
    assert result.returncode != 0
    expected = f"Template qwen2_vl_ground does not exist. llamafactory-vision {_report(module, hook)}"
    assert expected in result.stderr, result.stderr[-4000:]


@pytest.mark.parametrize(
    ("module", "hook", "extra"),
    [
        ("llamafactory.hparams.parser", "extend_arguments", {"bbox_head": True}),  # our keys are unknown to the host
        ("llamafactory.train.tuner", "dispatch_sft", {}),  # parsed, but would bypass our workflow silently
    ],
)
def test_our_keys_and_template_fail_naming_the_hook(module, hook, extra, tmp_path, tiny_models, demo_data):
    model = tiny_models["qwen2_vl"]
    config = train_config(model, demo_data, tmp_path / "out", "qwen2_vl_ground", max_steps=1, **extra)
    result = _run(module, hook, write_yaml(tmp_path / "ours.yaml", config))
    assert result.returncode != 0
    assert _warning(module, hook) in result.stderr
    assert _report(module, hook) in result.stderr.split(_warning(module, hook))[-1], result.stderr[-4000:]
    assert not (tmp_path / "out" / "trainer_log.jsonl").exists()


def test_hooks_module_that_cannot_import_leaves_the_host_unextended():
    """The bootstrap itself: if `patches` cannot be imported, LLaMA-Factory imports and runs without us, saying so."""
    code = (
        "import sys; sys.modules['llamafactory_vision.patches'] = None;"  # `import ...patches` then raises
        "import llamafactory.data.template as t, llamafactory.hparams.parser as p;"
        "print(sorted(k for k in t.TEMPLATES if k.endswith('_ground')), p._TRAIN_ARGS[1].__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=600,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[] DataArguments"
    assert result.stderr.count("WARNING llamafactory-vision: its hooks module failed to import (ModuleNotFoundError") == 1
