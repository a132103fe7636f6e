"""`make demo` end to end, in its quick mode (a few training steps): every step runs and the report is printed."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.e2e
def test_demo_quick_runs_every_step_and_reports(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(["llamafactory-vision", "demo", "--out", str(out), "--quick"], tmp_path)
    report = result.stdout
    for line in ("text acc@0.5", "head acc@0.5", "text mIoU", "parse failures", "pictures:"):
        assert line in report
    assert len(list((out / "preview").glob("*.png"))) == 8
    assert (out / "train" / "bbox_head.safetensors").is_file()
    after = json.loads((out / "predict_after" / "predict_results.json").read_text())
    for key in ("predict_acc@0.5", "predict_miou", "predict_head_acc@0.5", "predict_head_miou"):
        assert key in after
    rows = [json.loads(line) for line in (out / "predict_after" / "generated_predictions.jsonl").open()]
    assert rows and all("predict_boxes_head" in row for row in rows)
