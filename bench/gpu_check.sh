#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check` runs this; so can `bash bench/gpu_check.sh`
# where make is missing). Run it ON a CUDA machine with that machine's own python,
# torch and triton: no venv and no pins, since the machine may carry other versions
# than .venv (seen: torch 2.11, triton 3.6, python 3.12).
#   1. `fastdistill doctor` (builds the C++/CUDA extension against that torch),
#   2. tests/test_triton_device.py: every Triton op and the CUDA decode against the
#      torch reference in float64 on the GPU,
#   3. `fastdistill bench --device cuda`: one table of timings with a correctness
#      check per row.
# All three run; any failing fails the script. Peers (liger-kernel, POT, GeomLoss)
# come from wheels in .whl/ (`make gpu-wheels` on a machine with a registry, then
# carry .whl); without them their rows say "not installed".
# Output: $GPU_OUT (default $OUT, else bench/out/cuda): the table, JSON, junit XML, log.
# GPU_CHECK_STEPS="tests bench" (say) runs only those steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PY:-python3}"
OUTDIR="${GPU_OUT:-${OUT:-bench/out/cuda}}"
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .whl/site .whl/*.whl || { echo "gpu-check: installing the carried wheels failed"; exit 1; }
fi
export PYTHONPATH="$PWD:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 FASTDISTILL_TEST_DEVICE=cuda
status=0
step() {  # step NAME CMD...: run, time, remember a failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== gpu-check: $name"
  "$@" 2>&1 | tee -a "$OUTDIR/gpu-check.log" || status=1
  echo "== gpu-check: $name took $((SECONDS - t0)) s" | tee -a "$OUTDIR/gpu-check.log"
}
: > "$OUTDIR/gpu-check.log"
STEPS="${GPU_CHECK_STEPS:-doctor tests bench}"  # a rerun can name only the steps it needs
for s in $STEPS; do
  case $s in
    doctor) step doctor "$PY" -m fastdistill.cli doctor ;;
    tests) step tests "$PY" -m pytest -q -p no:cacheprovider --durations=10 tests/test_triton_device.py \
             --junitxml="$OUTDIR/gpu-check-tests.xml" ;;
    bench) step bench "$PY" -m fastdistill.cli bench --device cuda --out "$OUTDIR" ;;
    *) echo "gpu-check: unknown step '$s' in GPU_CHECK_STEPS (doctor, tests, bench)"; status=1 ;;
  esac
done
if [ $status -ne 0 ]; then echo "gpu-check: FAILED (see above)"; else echo "gpu-check: all passed"; fi
exit $status
