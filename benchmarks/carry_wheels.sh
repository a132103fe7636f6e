#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels benchmarks/gpu_all.sh installs on the lent GPU machine. That machine
# reaches no package index; its image has Python 3.12, torch 2.11.0, triton, accelerate, numpy, pandas, pyarrow and
# most of what the host imports, but not LLaMA-Factory, and a newer transformers and tokenizers than the pinned stack
# resolves (the image's package list: /work/.library/device/KINDS.md). Run here, from the repository root, after
# `make install` (the versions are read from .venv, so the GPU run uses the stack the tests ran on):
#
#   bash benchmarks/carry_wheels.sh      # then name .whl in the device run's `carry`; gpu_all.sh's first line installs it
#
# Carried, each with --no-deps (the image has the rest):
#   the pinned stack        llamafactory transformers tokenizers trl peft accelerate datasets dill multiprocess omegaconf
#   the edit benchmark      diffusers
#   the ZeRO-3 step         deepspeed (built here from its sdist, pure Python with DS_BUILD_OPS=0: no wheel on PyPI)
#                           and what it needs beyond the image: hjson pydantic pydantic-core annotated-types
#                           typing-inspection
#   Liger (fast-path row)   liger-kernel (pure Python; Triton is in the image)
# A device run carries at most 64 MiB in all; the script stops if .whl/ is larger.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
STACK=(llamafactory transformers tokenizers trl peft accelerate datasets dill multiprocess omegaconf diffusers
  pydantic pydantic-core annotated-types typing-inspection)
EXTRA=(hjson liger-kernel)  # not in .venv: the newest release
DEEPSPEED=${DEEPSPEED:-deepspeed}

pins=$("$PY" -c 'import sys, importlib.metadata as md; print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))' \
  "${STACK[@]}")
rm -rf "$DEST" && mkdir -p "$DEST"
# pip matches a manylinux tag exactly: the tags pydantic-core and tokenizers publish for x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" $pins "${EXTRA[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"

ls -1 "$DEST"
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${size} MiB"
if (( size > 64 )); then echo "over the 64 MiB a device run carries" >&2; exit 1; fi
