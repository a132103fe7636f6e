"""ground_eval's metrics on the benchmark's predictions and on generated ones of the other forms (JSON, box tokens,
LLaVA lists; in the labels' space and scaled by 1.5), under every --family: run once per tree, then compare.

    PYTHONPATH=OLD/plugin python same_metrics.py OLD old.json
    PYTHONPATH=NEW/plugin python same_metrics.py NEW new.json
    cmp old.json new.json
"""

import contextlib
import io
import json
import random
import runpy
import sys
import tempfile
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "benchmarks"))
from bench_grounding import bench_ground_eval

work = Path(tempfile.mkdtemp())
bench_ground_eval(work, rows=20000, repeat=1)
files = {"bench_qwen2_vl": work / "generated_predictions.jsonl"}
rng = random.Random(1)


def box(scale):
    x, y = rng.randrange(0, scale // 2), rng.randrange(0, scale // 2)
    return [x, y, x + rng.randrange(1, scale // 2), y + rng.randrange(1, scale // 2)]


def noisy(b, s=40, k=1.0):
    return [round(v * k) + rng.randrange(-s, s + 1) for v in b]


forms = {
    "json": lambda bs, refs: (
        "```json\n[\n"
        + ",\n".join("\t" + json.dumps({"bbox_2d": b, "label": r}) for b, r in zip(bs, refs))
        + "\n]\n```"
    ),
    "tokens": lambda bs, refs: "".join(
        f"<|object_ref_start|>{r}<|object_ref_end|><|box_start|>({b[0]},{b[1]}),({b[2]},{b[3]})<|box_end|>"
        for b, r in zip(bs, refs)
    ),
    "llava": lambda bs, refs: "; ".join(f"{r} [{', '.join(f'{v / 1000:.3f}' for v in b)}]" for b, r in zip(bs, refs)),
}
for name, form in forms.items():
    for k in (1.0, 1.5):  # 1.5: predictions in another space (the coordinate-space warning)
        path = work / f"{name}_{k}.jsonl"
        with path.open("w") as f:
            for i in range(3000):
                n = rng.choice((1, 1, 1, 2, 3))
                labels = [box(1000) for _ in range(n)]
                refs = [rng.choice(("car", "red car", "the man (left)", "dog; cat")) for _ in range(n)]
                preds = [noisy(b, k=k) for b in labels[: rng.choice((n, max(n - 1, 1), n + 1))]]
                predict = (
                    form(preds, refs)
                    if rng.random() > 0.05
                    else rng.choice(("no box", "", "(1,2),(3", '[{"bbox_2d": [1, 2'))
                )
                label = form(labels, refs) if rng.random() > 0.03 else "a red car"
                f.write(json.dumps({"prompt": "", "predict": predict, "label": label}) + "\n")
        files[f"{name}_{k}"] = path
ns = runpy.run_path(str(root / "eval" / "ground_eval.py"))
results = {}
for name, path in files.items():
    for family in ("auto", "qwen2_vl", "qwen3_vl", "llava"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                results[f"{name} --family {family}"] = ns["main"](["--predictions", str(path), "--family", family])
            except SystemExit as e:
                results[f"{name} --family {family}"] = f"SystemExit {e}"
out.write_text(json.dumps(results, indent=1, sort_keys=True))
print(len(results), "runs")
