#!/usr/bin/env bash
# On the lent GPU machine, after the TensorRT harness is staged in /tmp/stage (../shared/trt-harness):
# build FP16 and INT8 engines for the tiny config, time a rebuild with the timing cache, verify,
# inspect with Polygraphy, and run the tests marked `trt`. The workdir (built on the CPU machine by
# `make all`) travels as a carried path. Results go to $OUT (or ./device-out).
#   bash scripts/device_engines.sh [workdir]
set -uo pipefail
W=${1:-build/autoglm-phone-tiny}
# MODULES="vision embed" limits the run (TensorRT 8.5 builds attention-heavy graphs slowly on Hopper).
M=""; for m in ${MODULES:-vision audio embed decoder}; do M="$M -m $m"; done
PRECISIONS=${PRECISIONS:-fp16 int8}
OUT=${OUT:-device-out}
mkdir -p "$OUT"
PY=/tmp/stage/trtpy
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=160
export AUTOGLM_BUILD_TRT_TACTICS=${AUTOGLM_BUILD_TRT_TACTICS:-none}  # none: stubbed cuBLAS; cublas: real cuBLAS
export AUTOGLM_BUILD_CACHE_DIR=/tmp/autoglm-cache
cli() { $PY -m autoglm_build.cli "$@"; }
step() { echo; echo "=== $* ($(date +%T))"; }

step "GPU and the engine path's imports under the harness"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
$PY -c "import sys, autoglm_build.cli, autoglm_build.verify, autoglm_build.stages.engine, tensorrt, polygraphy
print(sys.version.split()[0], 'tensorrt', tensorrt.__version__, 'polygraphy', polygraphy.__version__,
      'torch imported:', 'torch' in sys.modules)"

step "fp16 engines, cold timing cache"
rm -rf "$AUTOGLM_BUILD_CACHE_DIR"
/usr/bin/time -f "wall %e s" $PY -m autoglm_build.cli engine --precision fp16 --max-batch 8 --opt-batch 4 $M -w "$W" 2>&1 | tee "$OUT/engine_fp16_cold.txt" | grep -E "engine-|wall|error"

step "fp16 engines again, warm timing cache (--force)"
/usr/bin/time -f "wall %e s" $PY -m autoglm_build.cli engine --precision fp16 --max-batch 8 --opt-batch 4 $M -w "$W" --force 2>&1 | tee "$OUT/engine_fp16_warm.txt" | grep -E "engine-|wall|error"

if [[ " $PRECISIONS " == *" int8 "* ]]; then
  step "int8 engines"
  /usr/bin/time -f "wall %e s" $PY -m autoglm_build.cli engine --precision int8 --max-batch 8 --opt-batch 4 $M -w "$W" 2>&1 | tee "$OUT/engine_int8.txt" | grep -E "engine-|wall|error|DCHECK|signal"
fi

step "verify (strict)"
P=""; for p in $PRECISIONS; do P="$P --precision $p"; done
cli verify -w "$W" --strict $M $P 2>&1 | tee "$OUT/verify.txt"
echo "verify exit: ${PIPESTATUS[0]}"

step "polygraphy inspect model"
$PY -c "import sys; from polygraphy.tools._main import main; sys.argv = ['polygraphy'] + sys.argv[1:]; main()" \
  inspect model "$W/engines/vision.fp16.engine" 2>&1 | tee "$OUT/inspect.txt" | head -40

step "tests marked trt"
AUTOGLM_BUILD_TRT_WORKDIR=$W $PY -m pytest -q -p no:cacheprovider -m trt tests/engine 2>&1 | tee "$OUT/pytest_trt.txt" | tail -15
cp "$W/manifest.json" "$OUT/manifest.json" 2>/dev/null
ls -la "$W/engines" | tee "$OUT/engines.txt"
