"""ground_eval pauses the cyclic garbage collector only while it scores, and always switches it back on."""

from __future__ import annotations

import gc
import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "ground_eval.py"


def test_collector_is_paused_while_scoring_and_restored(tmp_path, monkeypatch):
    ground_eval = runpy.run_path(str(SCRIPT))
    path = tmp_path / "generated_predictions.jsonl"
    path.write_text(json.dumps({"prompt": "", "predict": "a(0,0),(10,10)", "label": "a(0,0),(10,10)"}) + "\n")
    seen = []
    evaluate = ground_eval["_evaluate"]

    def spy(args):
        seen.append(gc.isenabled())
        return evaluate(args)

    monkeypatch.setitem(ground_eval["main"].__globals__, "_evaluate", spy)
    assert gc.isenabled()
    assert ground_eval["main"](["--predictions", str(path)])["acc@0.5"] == 1.0
    assert seen == [False] and gc.isenabled()

    def fail(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(ground_eval["main"].__globals__, "_evaluate", fail)
    with pytest.raises(RuntimeError, match="boom"):
        ground_eval["main"](["--predictions", str(path)])
    assert gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    try:
        with ground_eval["collector_paused"]():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
