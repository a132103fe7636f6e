#!/usr/bin/env bash
# GPU check: the bbox head under DeepSpeed ZeRO-3 (one GPU is enough: ZeRO-3 partitions the weights even then).
# Needs `pip install deepspeed`. Trains the tiny Qwen2-VL with yaml_examples/demo/qwen2vl_ground_head_ds3.yaml, then
# checks that every saved bbox_head.safetensors (final and per checkpoint) holds full, trained weights and that the
# final head is the best checkpoint's (load_best_model_at_end), then predicts with it.
# Usage: bash benchmarks/zero3_head_check.sh [NPROC]   (default 1; OUT=... to change the work folder)
set -euo pipefail
NPROC=${1:-1}
OUT=${OUT:-out/zero3_check}
export HF_HUB_OFFLINE=1 DISABLE_VERSION_CHECK=1
python -m llamafactory_vision.tiny --out "$OUT/models" --families qwen2_vl
python -m llamafactory_vision.synth grounding --out "$OUT/data" --preset demo --n 80 --val-frac 0.2
FORCE_TORCHRUN=1 NPROC_PER_NODE="$NPROC" llamafactory-cli train yaml_examples/demo/qwen2vl_ground_head_ds3.yaml \
    model_name_or_path="$OUT/models/qwen2_vl" dataset_dir="$OUT/data" output_dir="$OUT/ds3"
python - "$OUT/ds3" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

out = Path(sys.argv[1])
config = json.loads((out / "bbox_head_config.json").read_text())
hidden, layers = config["hidden_size"], config["num_layers"]
best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
heads = {p.parent.name: load_file(str(p)) for p in sorted(out.glob("**/bbox_head.safetensors"))}
for name, head in heads.items():
    for i in range(layers):
        expected = (4 if i == layers - 1 else hidden, hidden)
        assert tuple(head[f"bbox_fc{i}.weight"].shape) == expected, (name, i, head[f"bbox_fc{i}.weight"].shape)
    assert head[f"bbox_fc{layers - 1}.weight"].abs().sum() > 0, f"{name}: last layer still zero (nothing trained)"
final, best_head = heads[out.name], heads[Path(best).name]
assert all((final[k] == best_head[k]).all() for k in final), "final head is not the best checkpoint's"
print(f"OK: {len(heads)} full heads ({', '.join(heads)}), final == best ({Path(best).name})")
PY
FORCE_TORCHRUN=1 NPROC_PER_NODE="$NPROC" llamafactory-cli train yaml_examples/demo/qwen2vl_ground_head_ds3.yaml \
    model_name_or_path="$OUT/models/qwen2_vl" dataset_dir="$OUT/data" output_dir="$OUT/predict" \
    adapter_name_or_path="$OUT/ds3" do_train=false do_predict=true predict_with_generate=true do_sample=false \
    max_new_tokens=40 dataset=null load_best_model_at_end=false eval_strategy=no save_strategy=no deepspeed=null
test -s "$OUT/predict/generated_predictions.jsonl" && grep -o '"predict_head_n": [0-9]*' "$OUT/predict/predict_results.json"
