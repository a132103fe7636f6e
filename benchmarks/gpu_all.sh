python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/plugin
# Every GPU figure of benchmarks/RESULTS.md in one run (< 8 minutes on one H100/H200), from the repository root:
#
#   bash benchmarks/gpu_all.sh             # on the GPU machine; results under $OUT (default out/gpu_all)
#   bash benchmarks/gpu_all.sh --dry-run   # CPU check of the same steps at --small sizes (minutes)
#
# The first line installs the wheels carried in .whl/ into /tmp/site: the pinned stack, diffusers, deepspeed and what
# it needs, liger-kernel. `bash benchmarks/carry_wheels.sh` fills .whl/ here, before the device run. Steps, each under
# its own time cap and all under one deadline, so a hang costs one step only. Their caps add up to more than the
# deadline (the H200 run of 2026-11-30 needed ~470 s for what it finished), so they run in the order of what the figures
# are worth: the targets' ratios (a), the 1.3x goal, the ZeRO-3 check (pass/fail, never reached so far), the edit
# coupling target, the two cheap ones, and last (b), the costliest, which repeats (a)'s ratios on two more
# architectures and keeps whichever of its runs finished:
#   cpu       benchmarks/bench_grounding.py --workload cpu, on one pinned core, in the background
#   a         Qwen2-VL-2B LoRA r8 + full FT: stock vs ours vs ours + bbox head
#   fast_path benchmarks/bench_fast_path.py: Qwen2-VL-2B LoRA, whole runs through run_exp, stock vs every fast-path
#             switch on (fast tokenize, image cache, neat packing; Liger only if liger-kernel imports), 48 rows x 2
#             epochs (12 steps of 8 rows): what should fit its 150 s cap, not the goal's 200 steps (see RESULTS.md)
#   zero3     llamafactory-cli train yaml_examples/qwen2vl_ground_head_ds3.yaml with ZeRO-3 on a scaled-down random
#             Qwen2-VL (arch.py --small), one GPU under torchrun, then benchmarks/check_head.py (the saved head
#             reloads as predict loads it). benchmarks/zero3_head_check.sh is the longer check (checkpoints, predict).
#   edit      benchmarks/bench_edit.py --device cuda
#   mg_llava  benchmarks/bench_mg_llava.py --device cuda
#   head_loss benchmarks/bench_head_loss.py --devices cuda: the bbox head's loss fused vs unfused (bbox_fused_loss),
#             forward + backward, 8/64/512 boxes (~15 s)
#   b         Qwen2.5-VL-3B and Qwen3-VL-2B LoRA: the same three variants as (a)
# Results: $OUT/results/<step>.json (the JSON each step prints last on stdout), $OUT/log.txt (the tail of each
# step's output), $OUT/summary.txt: at most 8 files.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/out/gpu_all}
rm -rf "$OUT/results" && mkdir -p "$OUT/results" /tmp/gpu_all
: > "$OUT/log.txt"
START=$(date +%s)
BUDGET=${BUDGET_S:-465}  # seconds for all steps; the installs above ran before START
SCALE=1  # time caps x SCALE: a shared 2-core CPU runs the --small steps far slower than a GPU runs the real ones

# Our package is on PYTHONPATH, not pip-installed, so no .pth activates its import hook: a sitecustomize does, for
# every python process (llamafactory-cli and the torchrun workers too).
mkdir -p /tmp/lfv_boot
echo 'import llamafactory_vision._bootstrap as _lfv; _lfv.install()' > /tmp/lfv_boot/sitecustomize.py
export PYTHONPATH=/tmp/lfv_boot:${PYTHONPATH:-$PWD/plugin}
export PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false

if [ $DRY = 1 ]; then
  SIZE=(--small --steps 2 --warmup 1) DEVICE=cpu SCALE=6 BUDGET=${BUDGET_S:-2400}
  FAST=(--small --rows 4 --epochs 2 --batch-size 2 --image-sizes tiny)
else
  SIZE=() DEVICE=cuda FAST=(--rows 48 --epochs 2 --batch-size 8)
fi

declare -A STATUS
# run_step NAME CAP_SECONDS COMMAND...: the JSON the command prints last on stdout -> results/NAME.json; its output
# -> /tmp/gpu_all/NAME.log, the tail of it in log.txt.
run_step() {
  local name=$1 cap=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( cap > left )) && cap=$left
  if (( cap < 15 )); then STATUS[$name]="skipped (deadline)"; return; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "${REST[@]}" "$@" > "/tmp/gpu_all/$name.out" 2> "/tmp/gpu_all/$name.log"
  local rc=$?
  STATUS[$name]="rc=$rc $(( $(date +%s) - t0 ))s"
  (( rc == 124 || rc == 137 )) && STATUS[$name]="TIMEOUT after ${cap}s"
  collect "$name"
}
collect() {  # bench_grounding.py writes its own results/NAME.json (finished runs survive a time cap)
  [ -s "$OUT/results/$1.json" ] || python3 benchmarks/summarize.py extract "/tmp/gpu_all/$1.out" \
    > "$OUT/results/$1.json" 2>/dev/null || rm -f "$OUT/results/$1.json"
  { echo "===== $1: ${STATUS[$1]}"
    grep -h '^\[[0-9:]*\] ' "/tmp/gpu_all/$1.log"  # bench_grounding's timestamped phases, buried in the host's logs
    tail -n 40 "/tmp/gpu_all/$1.out" "/tmp/gpu_all/$1.log"; } >> "$OUT/log.txt"
}

# cpu: on a core of its own (PIN), in the background, while run_step keeps the GPU steps on the other cores (REST).
# The H200 run of 2026-11-30 pinned only the cpu step, so its core was not its own.
CPU_FLAGS=(); [ $DRY = 1 ] && CPU_FLAGS=(--small)
PIN=() REST=()
CPUS=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))  # a container's cores need not start at 0
if command -v taskset > /dev/null && (( ${#CPUS[@]} > 1 )); then
  PIN=(taskset -c "${CPUS[-1]}") REST=(taskset -c "$(IFS=,; echo "${CPUS[*]:0:${#CPUS[@]}-1}")")
fi
timeout $(( 420 * SCALE )) "${PIN[@]}" python3 benchmarks/bench_grounding.py --workload cpu "${CPU_FLAGS[@]}" \
  --out "$OUT/results/cpu.json" \
  > /tmp/gpu_all/cpu.out 2> /tmp/gpu_all/cpu.log &
CPU_PID=$!

run_step a 170 python3 benchmarks/bench_grounding.py --workload a --device $DEVICE "${SIZE[@]}" --out "$OUT/results/a.json"
run_step fast_path 150 python3 benchmarks/bench_fast_path.py --device $DEVICE "${FAST[@]}" --variants stock,all \
  --out "$OUT/results/fast_path.json"

zero3() {
  set -e
  local work=/tmp/gpu_all/zero3 ds=deepspeed=yaml_examples/deepspeed/ds_z3_config.json bf16=true
  rm -rf $work && mkdir -p $work
  if [ $DRY = 1 ]; then ds=deepspeed=null; bf16=false; fi  # no deepspeed on a CPU: torchrun only
  # --small (width 128): ZeRO-3 still partitions the head (its weights exceed the persistence threshold of
  # 10 x hidden), and the step fits the time left after the throughput runs.
  python3 benchmarks/arch.py --arch qwen2vl-2b --out $work/model --device $DEVICE --small >&2
  python3 -m llamafactory_vision.synth grounding --out $work/data --n 32 --preset demo --val-frac 0 >&2
  FORCE_TORCHRUN=1 NNODES=1 NPROC_PER_NODE=1 MASTER_PORT=29517 python3 -m llamafactory.cli train \
    yaml_examples/qwen2vl_ground_head_ds3.yaml model_name_or_path=$work/model dataset_dir=$work/data \
    dataset=synth_ground_train output_dir=$work/run max_steps=4 num_train_epochs=1 save_steps=1000 \
    per_device_train_batch_size=2 gradient_accumulation_steps=1 learning_rate=1e-3 preprocessing_num_workers=1 \
    dataloader_num_workers=0 image_max_pixels=262144 plot_loss=false bf16=$bf16 $ds >&2
  python3 benchmarks/check_head.py --model $work/model --adapter $work/run
}
if [ $DRY = 1 ] || python3 -c 'import deepspeed' 2>> /tmp/gpu_all/deepspeed_import.log; then
  run_step zero3 70 bash -c "$(declare -f zero3); DRY=$DRY DEVICE=$DEVICE; zero3"
else
  STATUS[zero3]="skipped: deepspeed does not import (see log)"
  { echo "===== zero3: deepspeed import failed"; tail -n 20 /tmp/gpu_all/deepspeed_import.log; } >> "$OUT/log.txt"
fi

OTHER=(); [ $DRY = 1 ] && OTHER=(--small)  # their own scaled-down mode
run_step edit 60 python3 benchmarks/bench_edit.py --device $DEVICE "${OTHER[@]}"
run_step mg_llava 60 python3 benchmarks/bench_mg_llava.py --device $DEVICE "${OTHER[@]}"

HEAD_LOSS=(--devices cuda); [ $DRY = 1 ] && HEAD_LOSS=(--devices cpu --small)
run_step head_loss 30 python3 benchmarks/bench_head_loss.py "${HEAD_LOSS[@]}" --out "$OUT/results/head_loss.json"
run_step b 190 python3 benchmarks/bench_grounding.py --workload b --device $DEVICE "${SIZE[@]}" --out "$OUT/results/b.json"

wait $CPU_PID; rc=$?
STATUS[cpu]="rc=$rc"
collect cpu

# Short table last.
{
  echo "gpu_all.sh: $(( $(date +%s) - START ))s after installs; $( [ $DRY = 1 ] && echo 'DRY RUN (CPU, --small)' )"
  for step in cpu a fast_path zero3 edit mg_llava head_loss b; do printf '%-9s %s\n' "$step" "${STATUS[$step]:-not run}"; done
  python3 benchmarks/summarize.py table "$OUT/results"
} | tee "$OUT/summary.txt"
