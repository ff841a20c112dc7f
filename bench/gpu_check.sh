#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check` runs this; so can `bash bench/gpu_check.sh`
# where make is missing). Run it ON a CUDA machine with that machine's own python,
# torch and triton: no venv and no pins, since the machine may carry other versions
# than .venv (seen: torch 2.11, triton 3.6, python 3.12).
#   build   `fastdistill build`: the C++ extension with its CUDA source, against that
#           torch. It takes minutes (nvcc on the torch headers), so it runs in the
#           background while the two steps that do not need it run:
#   tests   tests/test_triton_device.py: every Triton op against the torch reference
#           in float64 on the GPU;
#   bench   `fastdistill bench --device cuda`: one table of timings with a correctness
#           check per row;
#   cuda    once the build is done: `fastdistill doctor` and the CUDA soft-label
#           decode (the one hand-written CUDA kernel) against the readable decoder;
#   zero3   tests/test_hf_zero3.py on the GPU: KDTrainer under DeepSpeed ZeRO-3 with ONE
#           rank (NCCL takes one rank per GPU, and this machine has one) against a plain
#           run on the same GPU. World size 1 still puts every parameter through ZeRO-3's
#           partition/gather hooks (empty outside its module's forward), so it checks what
#           CPU CI cannot: the Triton fused loss reading a weight DeepSpeed's CUDA
#           accelerator gathered, and the teacher's inference engine on the GPU. The
#           2-rank comparison (the gradient reduced into real partitions) is CPU CI's
#           (DS_ACCELERATOR=cpu). Needs deepspeed on the machine (or its wheel and its
#           dependencies' in .whl); without it the step says so and fails.
# All steps run; any failing fails the script. Peers (liger-kernel, POT, GeomLoss)
# come from wheels in .whl/ (`make gpu-wheels` on a machine with a registry, then
# carry .whl; GPU_WHEELS_DIR names another folder); without them their rows say
# "not installed".
# Output: $GPU_OUT (default $OUT, else bench/out/cuda): the table, JSON, junit XML, logs.
# GPU_CHECK_STEPS="bench" (say) runs only those steps (of: build tests bench cuda zero3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PY:-python3}"
OUTDIR="${GPU_OUT:-${OUT:-bench/out/cuda}}"
STEPS=" ${GPU_CHECK_STEPS:-build tests bench cuda zero3} "
mkdir -p "$OUTDIR"
for s in $STEPS; do
  case $s in build|tests|bench|cuda|zero3) ;; *) echo "gpu-check: unknown step '$s' in GPU_CHECK_STEPS"; exit 1 ;; esac
done
LOG="$OUTDIR/gpu-check.log"
: > "$LOG"
status=0
WHEELS="${GPU_WHEELS_DIR:-.whl}"  # the peers' wheels (make gpu-wheels)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WHEELS/site" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"; then
    echo "gpu-check: installing the carried wheels in $WHEELS failed (the peer rows will say so)" | tee -a "$LOG"
    status=1
  fi
fi
export PYTHONPATH="$PWD:$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 FASTDISTILL_TEST_DEVICE=cuda
step() {  # step NAME CMD...: run, time, remember a failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== gpu-check: $name" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG" || status=1
  echo "== gpu-check: $name took $((SECONDS - t0)) s" | tee -a "$LOG"
}
wants() { [[ "$STEPS" == *" $1 "* ]]; }

if wants build; then
  echo "== gpu-check: build started in the background (log: $OUTDIR/build.log)" | tee -a "$LOG"
  build_t0=$SECONDS
  "$PY" -m fastdistill.cli build --verbose > "$OUTDIR/build.log" 2>&1 &
  build_pid=$!
fi
if wants tests; then
  step tests env FASTDISTILL_NO_BUILD=1 "$PY" -m pytest -q -p no:cacheprovider --durations=10 \
    tests/test_triton_device.py -k "not cuda_soft_label_decode" --junitxml="$OUTDIR/gpu-check-tests.xml"
fi
if wants bench; then
  step bench env FASTDISTILL_NO_BUILD=1 "$PY" -m fastdistill.cli bench --device cuda --out "$OUTDIR"
fi
if wants build; then
  echo "== gpu-check: build (waiting for it)" | tee -a "$LOG"
  wait "$build_pid" || status=1
  tail -n 3 "$OUTDIR/build.log" | tee -a "$LOG"
  echo "== gpu-check: build took $((SECONDS - build_t0)) s (in the background)" | tee -a "$LOG"
fi
if wants cuda; then
  step doctor "$PY" -m fastdistill.cli doctor
  step cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_device.py \
    -k "cuda_soft_label_decode or requested_device" --junitxml="$OUTDIR/gpu-check-cuda.xml"
fi
if wants zero3; then
  if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    step zero3 env FASTDISTILL_NO_BUILD=1 FASTDISTILL_ZERO3_NPROC=1 "$PY" -m pytest -q -p no:cacheprovider \
      -rs tests/test_hf_zero3.py --junitxml="$OUTDIR/gpu-check-zero3.xml"
  else
    echo "== gpu-check: zero3: deepspeed is not installed (carry its wheel in $WHEELS)" | tee -a "$LOG"
    status=1
  fi
fi
if [ $status -ne 0 ]; then echo "gpu-check: FAILED (see above)"; else echo "gpu-check: all passed"; fi
exit $status
