#!/usr/bin/env bash
# Issue 6's GPU checks in one go (under 5 minutes on an H200: each step has its own time limit, 290 s in all):
#   1. the CUDA-only tests (`gpu` marker): the kernels compiled, in bf16, and the child runtime with CUDA graphs;
#   2. benchmarks/kernels.py: kernel speed against copy bandwidth / SDPA flash / unfused torch (bf16);
#   3. benchmarks/runtime.py, bf16, random SmolLM2-sized parent and the smollm2-demo children: decode tok/s under
#      the runtime, its ratio to the parent against the ratio predicted from the runtime's own parts
#      (B=4 P=128 G=32, the demo's workload, then B=64 P=512 G=128 without the eager reference).
# Every figure and log goes under OUT_DIR; summary.txt lists each step's exit code and time.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            (from the repository root or anywhere)
#
# Needs python3 with CUDA torch and triton (PYTHON=... to choose another), pandas and pytest; the repository need
# not be installed. On the lent device machine (which returns at most 8 files from $OUT), pack the folder:
#   bash benchmarks/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp/gc .
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# `puzzle.kernels` and `puzzle.scoring` live in kernels/ and scoring/ (pyproject's package-dir): without an
# install, import them through a folder of links that has the installed layout, and run from there (so that the
# repository's own puzzle/ folder is not first on sys.path).
RUNDIR=$REPO
if ! (cd "$REPO" && "$PY" -c "import puzzle.kernels.ops, puzzle.runtime") 2>/dev/null; then
  RUNDIR=$(mktemp -d)
  mkdir -p "$RUNDIR/puzzle"
  for f in "$REPO"/puzzle/*; do ln -s "$f" "$RUNDIR/puzzle/"; done
  ln -s "$REPO/kernels" "$RUNDIR/puzzle/kernels"
  ln -s "$REPO/scoring" "$RUNDIR/puzzle/scoring"
  export PYTHONPATH="$RUNDIR${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$RUNDIR"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.txt, record rc and seconds
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
step pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_kernels_attention.py" \
  "$REPO/tests/test_kernels_rmsnorm.py" "$REPO/tests/test_kernels_swiglu.py" "$REPO/tests/test_runtime.py"
step kernels 90 "$PY" "$REPO/benchmarks/kernels.py" --csv "$OUT/kernels.csv"
step runtime_b4 55 "$PY" "$REPO/benchmarks/runtime.py" --out "$OUT/runtime_b4" --device cuda --dtype bfloat16 \
  --batch-size 4 --prompt-len 128 --gen-len 32 --repeats 5
step runtime_b64 45 "$PY" "$REPO/benchmarks/runtime.py" --out "$OUT/runtime_b64" --device cuda --dtype bfloat16 \
  --batch-size 64 --prompt-len 512 --gen-len 128 --repeats 3 --no-eager
cat "$OUT/summary.txt"
