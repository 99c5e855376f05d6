#!/usr/bin/env bash
# Issue 8's GPU measurements in one command, sized for one call of a lent H100/H200 (~8 min;
# the device budget is 15 min a session, start-up included). Prepared here so that a session
# that draws a GPU spends its minutes measuring, not debugging.
#
# Here, once (vector-quantize-pytorch and the dependencies the GPU image lacks, as wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl vector-quantize-pytorch==1.32.0 einx loguru torch-einops-utils frozendict
# Then with the device tool: command "bash benchmarks/gpu_suite.sh", carry [".whl"],
# timeout_s 600. Without a GPU, SMALL=1 runs the same sequence at toy sizes on the CPU (a check
# of this script, not a measurement).
#
# Everything lands in $OUT (default runs/gpu_suite): results.jsonl (one JSON line per case,
# each with a "suite" field naming its step) and log.txt (stderr, nvidia-smi, exit codes).
set -u
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
: >"$RESULTS"
: >"$LOG"
export PYTHONUNBUFFERED=1 VQCORE_CHECK_FINITE=0
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vqtok-site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/vqtok-site
fi
{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "import torch; print('torch', torch.__version__)"; } >>"$LOG"

if [ "${SMALL:-0}" = 1 ]; then
  DEV=cpu Q="--tokens 1024 --iters 2 --cases vq_d256_k8192_ema hrvq_d256_2x90 pq_d256_s4_k16"
  TARGETS="vq_d256_k8192_ema hrvq_d256_2x90"
  STEP="--models pvqvae:debug --batch 1 --frames 8 --size 64x64 --iters 2 --warmup 1"
  LONG="--models pvqvae:debug --batch 1 --frames 16 --size 64x64 --iters 1 --warmup 1"
  FUSED=auto
else
  DEV=cuda Q="--tokens 65536 --iters 10" FUSED=on
  # compiled in this order (the step's limit may cut the tail): the least room first
  TARGETS="rvq_d256_4x1024 vq_d256_k8192_ema looc_d256_m32_k256 lfq_2^16 hrvq_d256_2x90"
  TARGETS="$TARGETS vq_d256_k8100_flat looc_d256_m32_k256_nocvq"
  STEP="--models pvqvae:default --batch 4 --frames 16 --size 256x256 --iters 5 --warmup 2"
  LONG="--models pvqvae:default --batch 1 --frames 96 --size 256x256 --iters 2 --warmup 1"
fi

# step NAME SECONDS COMMAND...: run it (cut at its limit and at the suite's DEADLINE, seconds
# from the start, so the call returns with its results), tag its JSON lines "suite": NAME
DEADLINE=${DEADLINE:-560}
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, the suite's deadline is near" >>"$LOG"
    return
  fi
  local t0=$SECONDS
  echo "== $name (limit $limit s): $*" >>"$LOG"
  timeout "$limit" "$@" 2>>"$LOG" |
    $PY -c "import json,sys
for line in sys.stdin:
    try: rec = json.loads(line)
    except ValueError: sys.stderr.write(line); continue
    print(json.dumps({'suite': '$name', **rec}), flush=True)" >>"$RESULTS" 2>>"$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" >>"$LOG"
}

B="-m benchmarks"
OPTS="--device $DEV --dtypes bf16 --fused-optim --channels-last"
# in order of what matters most: the deadline cuts the tail
# 1. the quantizer targets against vector-quantize-pytorch, fused search, eager
step quantizers_fused 120 $PY $B.quantizers --device $DEV --fused $FUSED $Q
# 2. the kernel's correctness tests on the GPU itself (compiled Triton, not the interpreter)
step fused_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_ops_fused.py
# 3. the PVQ-VAE step: eager; with activation checkpointing, eager and compiled in one process
#    (the FLOPs are counted once per process)
step train_eager 90 $PY $B.train_step $OPTS $STEP
step train_ckpt 240 $PY $B.train_step $OPTS $STEP --grad-checkpoint --compile off,on \
  --profile /tmp/vqtok-prof
# 4. the targets compiled (the roofline leaves eager rvq 19 % under its goal: little room)
step quantizers_compiled 150 $PY $B.quantizers --device $DEV --fused $FUSED --compile on \
  --no-reference $Q --cases $TARGETS
# 5. 96 frames; the chunked torch search on the GPU (the fallback without Triton)
step train_96_frames 90 $PY $B.train_step $OPTS $LONG --grad-checkpoint
step quantizers_torch 60 $PY $B.quantizers --device $DEV --fused off --no-reference $Q
echo "suite done after $SECONDS s: $(wc -l <"$RESULTS") results in $RESULTS" | tee -a "$LOG"
