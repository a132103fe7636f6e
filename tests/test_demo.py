"""`make demo` end to end, in its quick mode (a few training steps): every step runs and the report is printed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, cli_env, one_torch_thread, write_yaml


@pytest.mark.e2e
def test_demo_quick_runs_every_step_and_reports(tmp_path, capsys, monkeypatch):
    """`llamafactory-vision demo --quick` through its ``main`` in this process (its own process would only add ~10 s
    of imports; the console script is run in tests/test_preview_eval.py), in the environment the CLI tests get; the
    demo starts its training, predict and eval steps as processes of their own, as `make demo` does."""
    from llamafactory_vision.cli import main

    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LLAMAFACTORY_VISION_DISABLE", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    with one_torch_thread():
        assert main(["demo", "--out", str(out), "--quick"]) == 0
    report = capsys.readouterr().out
    for line in ("text acc@0.5", "head acc@0.5", "text mIoU", "parse failures", "pictures:"):
        assert line in report
    assert "    training steps: 5/5 [" in report  # the host's progress, summarised while training runs
    assert len(list((out / "preview").glob("*.png"))) == 8
    assert (out / "train" / "bbox_head.safetensors").is_file()
    after = json.loads((out / "predict_after" / "predict_results.json").read_text())
    for key in ("predict_acc@0.5", "predict_miou", "predict_head_acc@0.5", "predict_head_miou"):
        assert key in after
    rows = [json.loads(line) for line in (out / "predict_after" / "generated_predictions.jsonl").open()]
    assert rows and all("predict_boxes_head" in row for row in rows)


TQDM_RUN = """
import sys, time
from tqdm import tqdm
for _ in tqdm(range(40), desc="Converting grounding dataset", mininterval=0):
    pass
for step in tqdm(range(1, 31), mininterval=0):  # the trainer's bar has no description
    if step % 10 == 0:
        print({"loss": 2.5 / step, "epoch": step / 30}, flush=True)
"""


def test_demo_commands_show_progress_on_the_terminal_and_everything_in_the_log(tmp_path, capsys):
    """Real tqdm bars (as the host prints them, to stderr with carriage returns) become a short status per tenth of
    each bar on a non-terminal stdout, with the last logged loss; the log keeps every refresh."""
    import sys

    from llamafactory_vision.demo_common import run_logged

    run_logged([sys.executable, "-c", TQDM_RUN], tmp_path / "run.log")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    converting = [line for line in lines if line.startswith("    Converting grounding dataset: ")]
    training = [line for line in lines if line.startswith("    training steps: ")]
    assert converting[-1].startswith("    Converting grounding dataset: 40/40 [")
    assert training[-1].startswith("    training steps: 30/30 [") and training[-1].endswith("loss 0.08333333333333333")
    assert len(converting) == 11 and len(training) == 11  # 0/N, then one per tenth: not one per refresh
    log = (tmp_path / "run.log").read_text()
    assert log.count("/40 [") >= 40 and log.count("/30 [") >= 30 and "'loss': 0.25" in log


def test_failed_command_raises_with_the_tail_of_its_log(tmp_path):
    import sys

    from llamafactory_vision.demo_common import run_logged

    with pytest.raises(RuntimeError, match=r"exit code 3; last lines of .*\n.*boom"):
        run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "fail.log")


def test_overrides_reach_the_resolved_yaml_and_the_output_folder_is_absolute(tmp_path, monkeypatch):
    import yaml
    from llamafactory_vision.demo_common import dotlist, prepare_out, write_resolved

    assert dotlist({"a": 1, "b": tmp_path / "x"}) == ["a=1", f"b={tmp_path / 'x'}"]
    src = tmp_path / "src.yaml"
    src.write_text("model_name_or_path: base\nmax_steps: 100\nbf16: true\n")
    write_resolved(src, tmp_path / "dst.yaml", {"max_steps": 5, "output_dir": tmp_path / "train"})
    resolved = yaml.safe_load((tmp_path / "dst.yaml").read_text())
    assert resolved == {"model_name_or_path": "base", "max_steps": 5, "bf16": True, "output_dir": str(tmp_path / "train")}
    monkeypatch.chdir(tmp_path)
    out, logs = prepare_out("rel/demo")
    assert out == tmp_path / "rel" / "demo" and logs == out / "logs" and logs.is_dir()


def _example_comments() -> dict[str, str]:
    """yaml_examples file -> its comment lines."""
    comments = {}
    for path in sorted((REPO / "yaml_examples").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        comments[str(path.relative_to(REPO))] = "\n".join(line for line in lines if line.lstrip().startswith("#"))
    return comments


def test_commands_in_example_comments_run_and_build_what_the_demo_builds(tmp_path):
    """The demo YAML's by-hand commands parse with the real command lines and give the demo's own model and data
    settings (its `synth` command once lacked the required `--n`)."""
    import re
    import shlex

    from llamafactory_vision import demo
    from llamafactory_vision.synth import build_parser
    from llamafactory_vision.tiny import build_tiny
    from llamafactory_vision.tiny import main as tiny_main

    comments = _example_comments()
    synth = {name: re.findall(r"python -m llamafactory_vision\.synth (.+)", text) for name, text in comments.items()}
    readme = [line.split("#")[0] for line in (REPO / "README.md").read_text().splitlines()]
    synth["README.md"] = [m for line in readme for m in re.findall(r"python -m llamafactory_vision\.synth (.+)", line)]
    assert synth["README.md"]
    for commands in synth.values():
        for command in commands:
            build_parser().parse_args(shlex.split(command))  # exits (fails the test) on a bad command
    (demo_synth,) = synth["yaml_examples/demo/qwen2vl_ground_train.yaml"]
    args = build_parser().parse_args(shlex.split(demo_synth))
    assert (args.n, args.val_frac, args.preset, args.seed) == (demo.DEMO_ROWS, 0.1, "demo", demo.SEED)

    demo_comments = comments["yaml_examples/demo/qwen2vl_ground_train.yaml"]
    (demo_tiny,) = re.findall(r"python -m llamafactory_vision\.tiny (.+)", demo_comments)
    argv = shlex.split(demo_tiny)
    argv[argv.index("--out") + 1] = str(tmp_path / "by_hand")
    tiny_main(argv)
    built = build_tiny("qwen2_vl", tmp_path / "demo" / "qwen2_vl", seed=demo.SEED, **demo.MODEL_SIZE)
    for file in ("config.json", "model.safetensors"):
        assert (tmp_path / "by_hand" / "qwen2_vl" / file).read_bytes() == (built / file).read_bytes(), file


def test_bf16_examples_say_what_to_do_on_cpu():
    for path in sorted((REPO / "yaml_examples").rglob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.startswith("bf16: true"):
                assert "on CPU set `bf16: false`" in line, path


def test_edit_demo_untrained_parts_repeat_from_run_to_run(edit_models, tmp_path):
    """The "before" figures of the edit demo come from a fresh edit head: seeded, they repeat whatever ran before."""
    import shutil

    from llamafactory_vision.editing.demo import _untrained_parts
    from llamafactory_vision.editing.parts import HEAD_DIR
    from safetensors.torch import load_file

    train_yaml = write_yaml(tmp_path / "train.yaml", {"seed": 7, "edit_head_width": 32, "edit_head_layers": 1,
                                                      "edit_head_ffn": 64, "edit_resolution": 32,
                                                      "edit_num_inference_steps": 2})  # fmt: skip
    states = []
    for attempt in range(2):
        model = shutil.copytree(edit_models["llava"], tmp_path / f"llava{attempt}")
        torch.manual_seed(attempt)  # a different global random state before each call
        _untrained_parts(model, edit_models["ip2p"], train_yaml)
        (weights,) = (model / HEAD_DIR).glob("*.safetensors")
        states.append(load_file(str(weights)))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0)


def test_grounding_demo_model_and_untrained_head_repeat_from_run_to_run(tmp_path):
    """Training starts from the head the demo saves beside the tiny model; unseeded, it made two runs of the same
    code train from different heads (text Acc@0.5 0.685 vs 0.848 after training)."""
    from llamafactory_vision.demo import build_model

    built = []
    for attempt in range(2):
        torch.manual_seed(attempt)  # a different global random state before each call
        built.append(build_model(tmp_path / f"run{attempt}"))
    files = sorted(path.name for path in built[0].iterdir())
    assert "bbox_head.safetensors" in files and files == sorted(path.name for path in built[1].iterdir())
    for name in files:
        assert (built[0] / name).read_bytes() == (built[1] / name).read_bytes(), name
