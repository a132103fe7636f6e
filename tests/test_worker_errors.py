"""Errors cross process boundaries intact: ``preprocessing_num_workers > 1`` runs the converter in worker processes,
which send an exception to the parent by pickling it. An exception the parent cannot rebuild leaves the pool waiting
forever (issue: a bad row hung the run at 100% CPU instead of stopping with the row named)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import pkgutil
import signal
import subprocess
from pathlib import Path

import llamafactory_vision
import pytest
from conftest import BIN, cli_env, train_config, write_yaml
from llamafactory_vision.boxes import BoxError
from llamafactory_vision.convert_records import RecordError
from llamafactory_vision.dataset_rows import RowError
from llamafactory_vision.editing.data import EditDataError
from llamafactory_vision.grounding.data import GroundingDataError
from llamafactory_vision.patches import _Deferred
from llamafactory_vision.webui.safe_paths import OutsideError
from PIL import Image

# One instance of every exception class the package defines (a new class fails the test below until added here).
SAMPLES = {
    "llamafactory_vision.boxes.BoxError": BoxError("objects[2].bbox", "outside_image", "x2 = 210 > width 200"),
    "llamafactory_vision.grounding.data.GroundingDataError": GroundingDataError(
        "rows.jsonl", 3, "objects[0].bbox", "x2 = 210 > width 200", "outside_image"
    ),
    "llamafactory_vision.patches._Deferred": _Deferred("llamafactory_vision.grounding.plugin"),
    "llamafactory_vision.dataset_rows.RowError": RowError("d.jsonl", 0, "answer", "empty", "empty_answer", "stroke_guess"),
    "llamafactory_vision.editing.data.EditDataError": EditDataError(
        "my_edits", 1, "target", "image file not found", "missing_image"
    ),
    "llamafactory_vision.convert_records.RecordError": RecordError("train.jsonl: line 2.mask_img: not found", "missing"),
    "llamafactory_vision.webui.safe_paths.OutsideError": OutsideError("dataset path '../x' leaves /data"),
}


def _our_exception_classes() -> set[str]:
    found = set()
    for info in pkgutil.walk_packages(llamafactory_vision.__path__, "llamafactory_vision."):
        if info.name.endswith("__main__"):  # running, not importing
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.add(f"{info.name}.{name}")
    return found


def test_every_exception_class_of_ours_is_covered():
    assert _our_exception_classes() == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_pickle_round_trip_keeps_type_message_and_fields(name):
    error = SAMPLES[name]
    rebuilt = pickle.loads(pickle.dumps(error))
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    assert vars(rebuilt) == vars(error)  # reason, field, row, ...: what skip counting and messages read


# ----------------------------------------------------------------------------------------------------------------
# End to end: a bad row with 1 and 2 dataset workers, for training, predict and preview
# ----------------------------------------------------------------------------------------------------------------

W, H = 64, 48
BAD_ROW = 3
TIMEOUT_S = 240  # a few seconds of work; the hang this guards against never ends


def _data_with_bad_row(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (200, 30, 30)).save(root / "ok.png")
    rows = [{"images": ["ok.png"], "objects": [{"ref": "red", "bbox": [4, 4, 40, 40]}]} for _ in range(6)]
    rows[BAD_ROW]["objects"][0]["bbox"] = [4, 4, 40, H + 9]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    info = {"synth_ground_train": {"file_name": "rows.jsonl", "formatting": "grounding"}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _command(kind: str, model: Path, data: Path, work: Path, workers: int | None) -> list[str]:
    """The command line of ``kind``; ``workers`` None leaves ``preprocessing_num_workers`` unset (host default)."""
    extra = {} if workers is None else {"preprocessing_num_workers": workers}
    config = train_config(model, data, work / "out", "qwen2_vl_ground", **extra)
    if kind == "predict":
        config.update(do_train=False, do_predict=True, predict_with_generate=True, max_new_tokens=8)
        config["eval_dataset"] = config.pop("dataset")
    path = write_yaml(work / f"{kind}.yaml", config)
    if kind == "preview":
        return [str(BIN / "llamafactory-vision"), "preview", str(path), "--out", str(work / "preview")]
    return [str(BIN / "llamafactory-cli"), "train", str(path)]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kind", "workers"),
    # One worker (1, or unset: the host's default, the same in-process path) converts in the main process, 2 in a
    # pool of worker processes; each kind builds its dataset its own way (predict: generation prompts of the eval set;
    # preview: our pipeline loader), so every kind runs both ways.
    [("train", 1), ("train", 2), ("predict", 1), ("predict", 2), ("preview", None), ("preview", 2)],
)
def test_bad_row_stops_the_run_with_the_row_named(kind, workers, tiny_models, tmp_path):
    data = _data_with_bad_row(tmp_path / "data")
    command = _command(kind, tiny_models["qwen2_vl"], data, tmp_path, workers)
    # A session of its own, so that a hang can be ended with its worker processes (they would outlive a plain kill).
    process = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"`{kind}` with preprocessing_num_workers={workers} hung on the bad row for {TIMEOUT_S} s")
    assert process.returncode != 0
    assert f"grounding dataset 'rows.jsonl', row {BAD_ROW} (counting from 0), field `objects[0].bbox`" in stderr, stderr[-3000:]
    assert "GroundingDataError" in stderr
