#!/usr/bin/env bash
# On the lent GPU, with the TensorRT harness staged in /tmp/stage (../shared/trt-harness): every
# tiny-config engine (four modules, fp16 and int8) built side by side in background processes, then
# verify, inspect, the `trt` tests and the server tests on the TensorRT backend. One `run` call per
# phase, back to back (the machine goes back 30 s after a call); the builds outlive the call that
# starts them (setsid), so later calls wait for them.
#   bash scripts/device_tiny.sh start [workdir]   copy the workdir to /tmp/dev/w, start one build per
#                                                  module and precision (BISECT=1: the Q/DQ bisect), wait
#   bash scripts/device_tiny.sh wait [seconds]     wait for the jobs (default 540 s), then poll
#   bash scripts/device_tiny.sh poll               what the jobs have printed so far
#   bash scripts/device_tiny.sh job NAME CMD...    one more background job (a CLI command on the workdir)
#   bash scripts/device_tiny.sh cache MODULE       timing cache: cold, warm and fresh-cache builds
#   bash scripts/device_tiny.sh check              verify --strict, inspect, pytest -m trt, tests/serve, bench
# Extra wheels for the Python 3.9 side (Pillow, pytest, openai: scripts/device-wheels-py39.txt) travel in .whl39/.
set -uo pipefail
PHASE=${1:?phase}
D=/tmp/dev; W=$D/w; L=$D/logs; CFG=configs/autoglm-phone-tiny.yaml
PY39=/tmp/stage/trtpy
OUT=${OUT:-device-out}
mkdir -p "$OUT" "$D" "$L"
export PYTHONPATH=$PWD:/tmp/site39 PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=160
export AUTOGLM_BUILD_TRT_TACTICS=${AUTOGLM_BUILD_TRT_TACTICS:-cublas} AUTOGLM_BUILD_CACHE_DIR=$D/cache
CLI="$PY39 -m autoglm_build.cli"

job() {  # job NAME "commands": a background process session that survives this call
  local name=$1; shift
  setsid nohup bash -c "$*" >"$L/$name.log" 2>&1 </dev/null &
  echo "job $name started"
}

engine() { echo "$CLI engine -c $CFG -w $W --max-batch 8 --opt-batch 4 $*"; }

cache_check() {  # cold, warm (same cache) and control (fresh cache) builds of one module
  local module=$1 precision=$2 preview=$3 cfg=$CFG tag
  if [ "$preview" = none ]; then
    cfg=$D/no-preview.yaml
    python3 - "$CFG" "$cfg" <<'EOF'
import sys, yaml
data = yaml.safe_load(open(sys.argv[1]))
data.setdefault("engine", {})["preview_features"] = []
yaml.safe_dump(data, open(sys.argv[2], "w"))
EOF
  fi
  for tag in cold warm control; do
    local cache=$D/tc-$module-$preview-${tag/warm/cold}
    [ "$tag" = control ] && cache=$D/tc-$module-$preview-control
    [ "$tag" = warm ] || rm -rf "$cache"
    AUTOGLM_BUILD_CACHE_DIR=$cache $CLI engine -c "$cfg" -w $D/wc --precision "$precision" -m "$module" --force \
      >"$L/cache-$module-$preview-$tag.log" 2>&1
    printf '%-8s %-7s %-8s build %s  cache %s bytes  %s\n' "$module" "$preview" "$tag" \
      "$(grep -o 'done in [0-9.]*s' "$L/cache-$module-$preview-$tag.log" | tail -1)" \
      "$(stat -c %s "$cache"/*.cache 2>/dev/null | head -1)" \
      "$(grep -c 'timing cache will not be used' "$L/cache-$module-$preview-$tag.log") 'not used' lines"
  done
}

case $PHASE in
start)
  rm -rf "$W" "$D/wc" && cp -r "${2:-build/autoglm-phone-tiny}" "$W" && cp -r "$W" "$D/wc"
  if ls .whl39/*.whl >/dev/null 2>&1; then
    for w in .whl39/*.whl; do python3 -m zipfile -e "$w" /tmp/site39; done
  fi
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  $PY39 -c "import sys, tensorrt, openai, PIL, autoglm_build.stages.engine, autoglm_build.serve.app
print(sys.version.split()[0], 'tensorrt', tensorrt.__version__, 'openai', openai.__version__, 'Pillow',
      PIL.__version__, 'torch imported:', 'torch' in sys.modules)"
  echo "== background builds"
  for precision in fp16 int8; do
    for module in decoder audio embed; do job "$module-$precision" "$(engine --precision $precision -m $module)"; done
  done
  for precision in fp16 int8; do job "vision-$precision" "$(engine --precision $precision -m vision)"; done
  [ "${BISECT:-0}" = 1 ] && job bisect "$PY39 scripts/trt_qdq_bisect.py -w $W -m vision -c $CFG --only 'none on Conv' \
    'none on the first Conv' 'none on activation x activation MatMul' 'only on MatMul/Gemm/Conv' \
    'none on Sigmoid/Mul/Add'"
  exec bash "$0" wait 520
  ;;
wait)
  end=$((SECONDS + ${2:-540}))
  while pgrep -f "[a]utoglm_build.cli engine|[t]rt_qdq_bisect" >/dev/null && [ $SECONDS -lt $end ]; do sleep 10; done
  pgrep -fa "[a]utoglm_build.cli engine|[t]rt_qdq_bisect" | cut -c1-150 || echo "all jobs finished"
  exec bash "$0" poll
  ;;
cache)
  cache_check "${2:-embed}" fp16 default | tee "$OUT/cache_check.txt"
  cache_check "${2:-embed}" fp16 none | tee -a "$OUT/cache_check.txt"
  ;;
poll)
  for f in "$L"/*.log; do echo "--- $(basename "$f")"; grep -E "done in|error|Error|FAILED|built|variant|DCHECK" "$f" | grep -v "^\[" | tail -12; done
  ls -la "$W/engines" 2>/dev/null
  tar -czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null; true
  ;;
job)
  name=$2; shift 2
  job "$name" "$CLI $* -c $CFG -w $W"
  ;;
check)
  echo "== verify --strict (TensorRT vs ONNX Runtime FP32, batch 1/4/8)"
  $CLI verify -c $CFG -w $W --strict --precision fp16 2>&1 | tee "$OUT/verify_fp16.txt"; echo "verify exit: ${PIPESTATUS[0]}"
  $CLI verify -c $CFG -w $W --strict --precision int8 ${INT8_MODULES:-} 2>&1 \
    | tee "$OUT/verify_int8.txt"; echo "verify exit: ${PIPESTATUS[0]}"
  echo "== polygraphy inspect model"
  $PY39 -c "import sys; from polygraphy.tools._main import main; sys.argv = ['polygraphy'] + sys.argv[1:]; main()" \
    inspect model "$W/engines/decoder.int8.engine" 2>&1 | tee "$OUT/inspect.txt" | head -30
  echo "== pytest -m trt"
  AUTOGLM_BUILD_TRT_WORKDIR=$W $PY39 -m pytest -q -p no:cacheprovider -m trt tests/engine 2>&1 | tail -8
  echo "== tests/serve on the TensorRT backend"
  AUTOGLM_BUILD_SERVE_BACKEND=tensorrt AUTOGLM_BUILD_SERVE_WORKDIR=$W \
    $PY39 -m pytest -q -p no:cacheprovider -rs tests/serve 2>&1 | tee "$OUT/pytest_serve.txt" | tail -15
  echo "== bench (engine inputs on the GPU beforehand)"
  $CLI bench -c $CFG -w $W -m vision -m decoder --backends tensorrt,onnxruntime --batches 1,8 --precision fp16 \
    --min-time 0.5 2>&1 | tee "$OUT/bench.txt"
  cp "$W/manifest.json" "$OUT/manifest.json"
  ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
