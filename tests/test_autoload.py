"""The .pth + import-hook bootstrap: autoload, opt-out, idempotence, already-imported modules, wheel installs,
torchrun, and proof that stock LLaMA-Factory runs are unchanged with the plugin installed."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, STOCK_TEMPLATE, cli_env, read_jsonl, run_cli, train_config, write_yaml

PROBE = (
    "import llamafactory.data.template as t, llamafactory.hparams.parser as p, llamafactory.train.tuner as tu;"
    "import json; print(json.dumps({'templates': sorted(k for k in t.TEMPLATES if k.endswith('_ground')),"
    "'data_args': p._TRAIN_ARGS[1].__name__, 'run_sft_wrapped': hasattr(tu.run_sft, '__wrapped__')}))"
)


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=cli_env(**env), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_autoload_registers_without_any_import_in_user_code():
    state = _probe()
    assert state["templates"] == ["qwen2_5_vl_ground", "qwen2_vl_ground", "qwen3_vl_ground"]
    assert state["data_args"] == "VisionDataArguments"
    assert state["run_sft_wrapped"] is True


def test_opt_out_env_var_leaves_host_untouched():
    state = _probe(LLAMAFACTORY_VISION_DISABLE="1")
    assert state == {"templates": [], "data_args": "DataArguments", "run_sft_wrapped": False}


@pytest.mark.parametrize(
    "first",
    ["llamafactory_vision.grounding.plugin", "llamafactory_vision.grounding.data", "llamafactory_vision.hparams",
     "llamafactory_vision.grounding.workflow", "llamafactory_vision.grounding.preview",
     "llamafactory_vision.editing.data", "llamafactory_vision.editing.workflow", "llamafactory_vision.editing.tokens"],
)  # fmt: skip
def test_importing_our_modules_before_the_host_defers_hooks_until_they_finish(first):
    """Our module imports the host, whose import hook needs our (half-imported) module: the hook must wait."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {first};" + PROBE], env=cli_env(), capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["templates"] == ["qwen2_5_vl_ground", "qwen2_vl_ground", "qwen3_vl_ground"]
    assert state["data_args"] == "VisionDataArguments"


def test_editable_install_records_the_pth_for_uninstall():
    import importlib.metadata

    files = [str(f) for f in importlib.metadata.distribution("llamafactory-vision").files]
    assert "llamafactory_vision.pth" in files


def test_modules_imported_before_install_are_extended_once():
    code = (
        "import os; os.environ['LLAMAFACTORY_VISION_DISABLE'] = '1';"
        "import llamafactory.data.template as t; assert 'qwen2_vl_ground' not in t.TEMPLATES;"
        "del os.environ['LLAMAFACTORY_VISION_DISABLE'];"
        "import llamafactory_vision._bootstrap as b, llamafactory_vision.patches as p;"
        "b.install(); b.install(); p.apply_to_imported();"
        "assert 'qwen2_vl_ground' in t.TEMPLATES;"
        "import llamafactory.data.loader as l; print(hasattr(l.align_dataset, '__wrapped__'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env(LLAMAFACTORY_VISION_DISABLE="1"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True"


def test_regular_wheel_ships_pth_and_templates_and_autoloads(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("llamafactory_vision-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "llamafactory_vision.pth" in names
    (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
    assert "llamafactory_vision.pth," in archive.read(record).decode()  # so `pip uninstall` removes it
    assert "llamafactory_vision/templates/qwen2_5_vl_ground.yaml" in names

    # A fresh venv holding only the wheel; the pinned stack comes from this venv's site-packages via a path line.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    (site / "zz_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = env_dir / "bin" / "python"
    out = subprocess.run([str(python), "-c", PROBE + ";import llamafactory_vision as v; print(v.__file__)"],
                         env=cli_env(), capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.splitlines()[-2])
    assert state["templates"] == ["qwen2_5_vl_ground", "qwen2_vl_ground", "qwen3_vl_ground"]
    assert out.stdout.splitlines()[-1].startswith(str(site))


def _stock_dataset(root: Path, images: list[str]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"<image>What is drawn here? ({i})"},
                      {"role": "assistant", "content": f"A shape, number {i}."}], "images": [img]}
        for i, img in enumerate(images)
    ]  # fmt: skip
    (root / "stock.json").write_text(json.dumps(rows))
    info = {"stock": {"file_name": "stock.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content",
                               "user_tag": "user", "assistant_tag": "assistant"}}}  # fmt: skip
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.e2e
def test_stock_sft_run_is_identical_with_and_without_plugin(tmp_path, tiny_models, demo_data):
    """Same token ids (the tokenized dataset LLaMA-Factory builds) and the same training loss, to the last bit."""
    images = [str(demo_data / r["images"][0]) for r in read_jsonl(demo_data / "ground_train.jsonl")][:4]
    data = _stock_dataset(tmp_path, images)
    results = {}
    for mode, env in (("plugin", {}), ("disabled", {"LLAMAFACTORY_VISION_DISABLE": "1"})):
        out = tmp_path / mode
        config = train_config(tiny_models["qwen2_vl"], data, out, STOCK_TEMPLATE["qwen2_vl"], dataset="stock",
                              tokenized_path=str(tmp_path / f"tok_{mode}"))  # fmt: skip
        run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / f"{mode}.yaml", config))], tmp_path, **env)
        from datasets import load_from_disk

        tokenized = load_from_disk(str(tmp_path / f"tok_{mode}"))["train"]
        results[mode] = (tokenized["input_ids"], tokenized["labels"], json.loads((out / "trainer_log.jsonl")
                         .read_text().splitlines()[0])["loss"])  # fmt: skip
    assert results["plugin"] == results["disabled"]


@pytest.mark.e2e
def test_autoload_under_torchrun(tmp_path, tiny_models, demo_data):
    """FORCE_TORCHRUN makes llamafactory-cli re-execute launcher.py by path under torchrun: only the .pth can load
    us there, and a grounding template only exists if it did."""
    config = train_config(tiny_models["qwen2_vl"], demo_data, tmp_path / "out", "qwen2_vl_ground", max_steps=1,
                          ddp_backend="gloo")  # fmt: skip
    result = run_cli(["llamafactory-cli", "train", str(write_yaml(tmp_path / "t.yaml", config))], tmp_path,
                     FORCE_TORCHRUN="1", NPROC_PER_NODE="1")  # fmt: skip
    assert "torchrun" in result.stdout + result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
