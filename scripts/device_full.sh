#!/usr/bin/env bash
# On the lent GPU, with the TensorRT harness staged in /tmp/stage: the full-width few-layer config
# (configs/autoglm-phone-9b-2layer.yaml) exported, optimized and calibrated on the machine's Python
# 3.12 (torch), its vision and decoder engines built on the harness (TensorRT 8.5, Python 3.9), then
# `bench`: PyTorch eager fp16 first (it also measures the copy bandwidth and matmul rate), TensorRT
# fp16/int8 second, one table side by side; then `profile` says where the time goes. With
# TINY_MODULES set, the tiny build's engines are rebuilt beside it and verified. One `run` call per
# phase, back to back; builds run as background process sessions.
#   bash scripts/device_full.sh start [tiny workdir]   start every job (FULL_MODULES, FULL_PRECISIONS; TINY_MODULES), wait
#   bash scripts/device_full.sh ready                  after the harness's parts are in /tmp/stage: unpack it once and
#                                                      let the waiting engine builds go (start needs no harness: the
#                                                      Python 3.12 graphs run while the parts arrive)
# FULL_DECODER_STAGES=N: the decoder as N layer-range stages (decoder.stages, issue 15) in its own workdir, one
# engine build per stage, in parallel. CHECKPOINT=1: the full-width slice's weights are a checkpoint in the
# published layout (scripts/make_layout_checkpoint.py, written first into /tmp/dev/ckpt) that export reads
# with --checkpoint, so transformers' own model (benchmarks/agent_generate.py) loads the same weights.
# AUTOGLM_BUILD_TRT_LOG=verbose: TensorRT's verbose builder log with timestamps in each build's log (large):
# where a slow build spends its time (the long-context decoder's LM-head stage: over 11 min on TensorRT 8.5).
# TINY_STAGED=1: the tiny config's embed and decoder in two stages (/tmp/dev/staged), graphs made here, fp16 engines
# built on the harness (round robin over GPUS), for the two-GPU test (phase twogpu).
#   bash scripts/device_full.sh twogpu                 tiny staged: the same tokens with the stages on GPUs 0 and 1
#   bash scripts/device_full.sh devtests               tiny: the TensorRT backend's GPU tests, bench-serve on TensorRT
#   bash scripts/device_full.sh serveload              full width: bench-serve, the agent load, transformers' generate
#   bash scripts/device_full.sh serveab                tiny and full width: serve/engine, this tree against $OLD's
#   bash scripts/device_full.sh tinyserve              tiny: serve/engine per serve.stream_interval_ms (INTERVALS)
#   bash scripts/device_full.sh spy                    tiny: py-spy on the server under serve_load, cProfile on the engine
#   bash scripts/device_full.sh wait [seconds]         wait for the jobs, then poll
#   bash scripts/device_full.sh tiny                   tiny: verify int8, bench
#   bash scripts/device_full.sh serve                  tiny: tests/serve on the TensorRT backend (fp16 engines)
#   bash scripts/device_full.sh profile                full width: TensorRT per-layer times, torch.profiler kernels
#                                                      (one-graph decoder only: the 2-layer config's head stage off)
#   bash scripts/device_full.sh bench                  full width: torch, then TensorRT
#   bash scripts/device_full.sh overhead               full width: TensorRT called through Polygraphy, bound, CUDA graph
# The whole 9B model (issue 15), the decoder and embed of configs/autoglm-phone-9b.yaml (40 layers in 8 stages + the head
# stage; NINE_MODULES="vision embed decoder" adds the vision tower's 7 parts: 6 block stages + the merger's) from a 9B
# checkpoint in the published layout written on the device (NINE_CKPT, bf16), each part's chain in its own process
# (export -> optimize -> its export's weights removed -> FP16 graph without calibrate's own measurement -> engine on
# the next of $GPUS), verify of each module as soon as its engines exist; NINE_AUDIO=1 adds the audio encoder:
#   bash scripts/device_full.sh nine-lease [seconds]  nine laid out over the machine's GPUs (and issue 14's tiny devtests
#                                                      on the last of 4 H200s with TINY_DIR set)
#   bash scripts/device_full.sh nine [seconds]        start every job, wait; NINE_CONTEXT/NINE_OPT_PAST/NINE_WORKSPACE
#                                                      override engine.context/opt_past/workspace_mib for the lease
#   bash scripts/device_full.sh nine-check            the agent served, TensorRT and torch decoder benches at 40 layers,
#                                                      engine memory; NINE_OVERLAP="1 0": text serve/engine runs too
#   bash scripts/device_full.sh nine-verify           verify (chained engines vs ONNX Runtime; FP16 vs FP32)
#   bash scripts/device_full.sh nine-twogpu           the 9B decoder's stages over GPUs 0 and 1: the tokens of one GPU
# Wheels: .whl/ for the Python 3.12 side (pydantic, onnxslim, the tested transformers, ...) and .whl39/
# for the harness's Python 3.9 (Pillow, pytest, openai, ...), made by scripts/fetch_device_wheels.sh from
# the lists beside it.
set -uo pipefail
PHASE=${1:?phase}
D=/tmp/dev; L=$D/logs; F=$D/full; W=$D/w
FULL=configs/autoglm-phone-9b-2layer.yaml; TINY=configs/autoglm-phone-tiny.yaml
STAGES=${FULL_DECODER_STAGES:-1}
CKPT=$D/ckpt
derive() {  # derive SRC DST SUFFIX PYTHON: a copy of config SRC with the change PYTHON makes to its dict d
  # (written beside DST, then moved into place: a process reading DST never sees it half written)
  python3 -c "import os, sys, yaml; d = yaml.safe_load(open(sys.argv[1])); d['name'] += sys.argv[3]
$4
yaml.safe_dump(d, open(sys.argv[2] + '.tmp', 'w')); os.replace(sys.argv[2] + '.tmp', sys.argv[2])" "$1" "$2" "$3"
}
if [ -n "${CHECKPOINT:-}" ]; then  # the slice's weights from a checkpoint in the published layout
  derive "$FULL" configs/autoglm-phone-9b-2layer-ckpt.yaml -ckpt "d['checkpoint'] = '$CKPT'"
  FULL=configs/autoglm-phone-9b-2layer-ckpt.yaml
fi
TINYS=configs/autoglm-phone-tiny-staged2.yaml; WS=$D/staged
derive "$TINY" "$TINYS" -staged "d['decoder'] = {'stages': 2}"
FULLD=$FULL; FD=$F  # the decoder's config and workdir: the full ones, or a staged copy of its own
if [ "$STAGES" -gt 1 ]; then
  FULLD=${FULL%.yaml}-staged$STAGES.yaml; FD=$D/full-staged$STAGES
  derive "$FULL" "$FULLD" -staged "d.setdefault('decoder', {})['stages'] = $STAGES"
fi
NINE=${NINE_CONFIG:-configs/autoglm-phone-9b.yaml}; N9C=configs/autoglm-phone-9b-lease.yaml; N9=$D/9b
N9AC=configs/autoglm-phone-9b-lease-audio.yaml; N9A=$D/9b-audio  # NINE_AUDIO=1: the speech encoder in a workdir of its own
# the 20 GiB checkpoint in memory where /dev/shm has room (the lease's disk holds ~100 GB of graphs and engines)
SHM_FREE=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' '); SHM_FREE=${SHM_FREE:-0}
N9CKPT=${NINE_CKPT:-$([ "$SHM_FREE" -ge 40 ] 2>/dev/null && echo /dev/shm/ckpt9b || echo $D/ckpt9b)}
# the lease config is derived by the phase `nine` alone, from its NINE_* variables; every later phase reads it back
# (its modules and opt_past), so a phase run without those variables cannot rewrite what the builds read
if [ "$PHASE" = nine ]; then
  NINE_PAST=${NINE_OPT_PAST:-4096}; NINE_MODULES=${NINE_MODULES:-embed decoder}  # e.g. "vision embed decoder"
  derive "$NINE" "$N9C" -lease "d['modules'] = '$NINE_MODULES'.split(); d['checkpoint'] = '$N9CKPT'
d['tokenizer'] = 'tokenizers/autoglm-phone-tiny.json'  # random weights: any tokenizer within the vocabulary
d['calibrate']['measure_fp16'] = False  # verify measures the chained FP16 graphs; the 9 parts convert in parallel
d['engine'].update(context=${NINE_CONTEXT:-8192}, opt_past=$NINE_PAST, workspace_mib=${NINE_WORKSPACE:-12288})"
elif [ "$PHASE" != nine-lease ] && [ -e "$N9C" ]; then  # nine-lease passes the caller's NINE_* on to nine
  read -r NINE_PAST NINE_MODULES < <(python3 -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))
print(d['engine']['opt_past'], ' '.join(d['modules']))" "$N9C")
fi
# engine builds wait for the staged harness; '&&' so that "X && $HARNESS build" builds only after X succeeded
HARNESS="while [ ! -e /tmp/stage/.ready ]; do sleep 5; done &&"
OUT=${OUT:-device-out}  # the run tool's $OUT on the device; off it, this folder (ignored)
mkdir -p "$OUT" "$D" "$L"
export PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=160 AUTOGLM_BUILD_TRT_TACTICS=${AUTOGLM_BUILD_TRT_TACTICS:-cublas}
export AUTOGLM_BUILD_CACHE_DIR=$D/cache
CLI39="env PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy -m autoglm_build.cli"
CLI312="env PYTHONPATH=$PWD:/tmp/site312 python3 -m autoglm_build.cli"

GPU_LIST=(${GPUS:-}); GPU_I=0
LAST_GPU=0; [ ${#GPU_LIST[@]} -gt 0 ] && LAST_GPU=${GPU_LIST[${#GPU_LIST[@]}-1]}
on_gpu() {  # ON: the next of $GPUS (e.g. GPUS="0 1") for one engine build, round robin; empty without GPUS
  ON=""
  if [ ${#GPU_LIST[@]} -gt 0 ]; then ON="env CUDA_VISIBLE_DEVICES=${GPU_LIST[$((GPU_I % ${#GPU_LIST[@]}))]}"; fi
  GPU_I=$((GPU_I + 1))
}

gpu_slot() {  # gpu_slot GPU COMMAND...: COMMAND once one of GPU's $SLOTS build slots is free (a lock file each):
  # a 9B lease starts 16 engine builds on two GPUs, more at once than one GPU's memory holds
  local gpu=$1 s rc; shift
  while :; do
    for s in $(seq 1 "${SLOTS:-4}"); do
      exec 9>"/tmp/dev/slot-gpu$gpu-$s"
      if flock -n 9; then
        echo "=== $(date +%s) $(date +%T) slot $s of GPU $gpu"
        "$@"; rc=$?; flock -u 9; exec 9>&-; return $rc
      fi
      exec 9>&-
    done
    sleep 5
  done
}
export -f gpu_slot

pin() { command -v taskset >/dev/null && echo "taskset -c $1"; }  # pin CPUS: the words that run a command on those CPUs

mark_wait() {  # mark_wait DONE FAILED [ON_FAIL]: the loop a job waits in until the marker DONE exists; FAILED's
  # appearing ends the job (after ON_FAIL), so that nothing waits for ever on a chain that failed
  echo "while [ ! -e $1 ]; do [ -e $2 ] && { ${3:+$3; }exit 1; }; sleep 3; done"
}

spied() {  # spied SITE DIR MODE CONFIG WORKDIR [serve_load args...]: serve_load.py (TensorRT, no load phase) on Python
  # path SITE with py-spy ($PYSPY; MODE --idle or --gil) attached to its server as soon as it starts: its lines in
  # DIR/serve_load.txt, the raw stacks per thread in DIR/spy_server.txt. DIR must not be $OUT: a call brings back only
  # so many files (the eighth session's stacks were lost so); tar it into $OUT
  local site=$1 dir=$2 mode=$3 c=$4 w=$5 load pid=""; shift 5
  ( PYTHONPATH=$PWD:$site timeout 400 /tmp/stage/trtpy benchmarks/serve_load.py -c "$c" -w "$w" --backend tensorrt \
      --clients 0 --ready-timeout 300 "$@" 2>&1 | grep -v "^\[W\]" >"$dir/serve_load.txt" ) &
  load=$!
  while [ -z "$pid" ] && kill -0 $load 2>/dev/null; do pid=$(pgrep -f "[a]utoglm_build serve -c $c -w $w " | head -1); sleep 0.2; done
  [ -n "$pid" ] && "$PYSPY" record --pid "$pid" --nonblocking --threads $mode -r 250 -f raw -o "$dir/spy_server.txt" \
    >"$dir/spy.log" 2>&1
  wait $load
}

job() {  # job NAME "commands": a background process session that survives this call
  local name=$1; shift
  setsid nohup bash -c "$*" >"$L/$name.log" 2>&1 </dev/null &
  echo "job $name started"
}

case $PHASE in
start)  # the full-width chains (FULL_MODULES), and the tiny INT8 rebuild if TINY_MODULES names modules; NO_WHEELS=1: off the device
  [ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site312 .whl/*.whl || exit 1
  if [ -z "${NO_WHEELS:-}" ] && ls .whl39/*.whl >/dev/null 2>&1; then  # Pillow, pytest, openai for the engine path and tests on Python 3.9
    for w in .whl39/*.whl; do python3 -m zipfile -e "$w" /tmp/site39; done
  fi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
  # the decoder's parts as its config has them (layer stages, and the head stage with decoder.head_stage),
  # read before any job starts
  DECODER_PARTS=$(env PYTHONPATH=$PWD:/tmp/site312 python3 -c "import sys
from autoglm_build.config import load_config
from autoglm_build.modules import registry
print(' '.join(registry.expand(load_config(sys.argv[1]), ['decoder'])))" "$FULLD") \
    || { echo "error: cannot read the decoder's parts from $FULLD"; exit 1; }
  if [ -n "${TINY_MODULES:-}" ]; then
    rm -rf "$W" && cp -r "${2:-build/autoglm-phone-tiny}" "$W"
    for precision in ${TINY_PRECISIONS:-int8}; do
      for module in $TINY_MODULES; do
        on_gpu; job "tiny-$module-$precision" "$HARNESS $ON $CLI39 engine -c $TINY -w $W --precision $precision -m $module \
          && touch $W/.engine-$module-$precision || touch $W/.failed-$module-$precision"
      done
    done
    if [ -n "${DEVTESTS:-}" ]; then  # phase devtests as a job once those engines are built (on the last of GPUS),
      # its files in $D/devout (a later call copies them into its own \$OUT)
      twait=""
      for precision in ${TINY_PRECISIONS:-int8}; do
        for module in $TINY_MODULES; do
          twait="$twait $(mark_wait $W/.engine-$module-$precision $W/.failed-$module-$precision);"
        done
      done
      mkdir -p $D/devout
      job devtests "$twait env OUT=$D/devout CUDA_VISIBLE_DEVICES=${DEVTESTS_GPU:-$LAST_GPU} bash $0 devtests"
    fi
  fi
  if [ -n "${TINY_STAGED:-}" ]; then  # the two-GPU test's build: tiny, decoder in two stages, fp16
    c="-c $TINYS -w $WS"
    graphs="$CLI312 export $c -m embed -m decoder && $CLI312 optimize $c -m embed -m decoder"
    graphs="$graphs && env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py $c -m decoder"
    graphs="$graphs && $CLI312 calibrate --fp16 $c -m embed -m decoder"
    builds=""
    for part in embed decoder.stage0 decoder.stage1; do on_gpu; builds="$builds $ON $CLI39 engine $c -m $part --precision fp16 &"; done
    job tiny-staged "$graphs && $HARNESS { $builds wait; }"
  fi
  WEIGHTS=""
  if [ -n "${CHECKPOINT:-}" ]; then  # every full-width chain waits for the checkpoint
    job ckpt "env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/make_layout_checkpoint.py -c $FULL -o $CKPT \
      && touch $CKPT.done || touch $CKPT.failed"
    WEIGHTS="$(mark_wait $CKPT.done $CKPT.failed) &&"
    if [ -n "${BASELINE_GPU:-}" ]; then  # transformers' generate on the agent's requests, alone on a GPU of its own,
      # while the engines build elsewhere (serveload then reads its row instead of running it)
      job baseline "$WEIGHTS env CUDA_VISIBLE_DEVICES=$BASELINE_GPU PYTHONPATH=$PWD:/tmp/site312 timeout 900 python3 \
        benchmarks/agent_generate.py -c $FULLD --checkpoint $CKPT --agent ${AGENT:-8x5} --agent-tokens 32 \
        --json $D/agent_generate.json"
    fi
  fi
  for module in ${FULL_MODULES-vision decoder}; do  # FULL_MODULES= (empty): none
    f="-c $FULL -w $F -m $module"
    samples="env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py $f"
    graphs="$CLI312 export $f && $CLI312 optimize $f && $samples"
    parts=$module
    if [ "$module" = decoder ]; then  # the decoder calibrates on embedded text: embed is exported beside it
      f="-c $FULLD -w $FD -m $module"; e="-c $FULLD -w $FD -m embed"
      samples="env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py $f"
      # both halves must succeed (a bare wait returns 0 whatever failed)
      graphs="{ $CLI312 export $f & a=\$!; $CLI312 export $e & b=\$!; wait \$a && wait \$b; }"
      graphs="$graphs && { $CLI312 optimize $f & a=\$!; $CLI312 optimize $e & b=\$!; wait \$a && wait \$b; }"
      graphs="$graphs && $samples"
      parts=$DECODER_PARTS
    fi
    engines=""  # one engine per precision (FULL_PRECISIONS) and stage, each built as soon as its graph is calibrated
    for precision in ${FULL_PRECISIONS:-fp16 int8}; do
      builds=""
      for part in $parts; do on_gpu; builds="$builds $ON $CLI39 engine ${f% -m *} -m $part --precision $precision &"; done
      engines="$engines { $CLI312 calibrate --$precision $f && $HARNESS { $builds wait; }; } &"
      if [ "$module" = decoder ]; then  # the server's embedding engine beside the decoder's
        on_gpu; engines="$engines { $CLI312 calibrate --$precision $e && $HARNESS $ON $CLI39 engine $e --precision $precision; } &"
      fi
    done
    job "full-$module" "$WEIGHTS $graphs && { $engines wait; }"
  done
  if [ -n "${SERVELOAD:-}" ]; then  # phase serveload as a job once every build above is done (its GPU: the first of
    # GPUS), its files in $D/serveout
    mkdir -p $D/serveout
    # (and for the devtests and the generate baseline: its timed runs measure the host's work, on CPUs they would share)
    job serveload "sleep 30; while pgrep -f '[a]utoglm_build.cli (export|optimize|calibrate|engine)|[d]evice_full.sh devtests|[a]gent_generate.py' \
      >/dev/null; do sleep 5; done; env OUT=$D/serveout CUDA_VISIBLE_DEVICES=${GPU_LIST[0]:-0} bash $0 serveload"
  fi
  exec bash "$0" wait "${START_WAIT:-480}"
  ;;
nine)  # the 9B model's decoder and embed, every part in parallel (see the header); NO_WHEELS=1: a dry run off the device
  if [ -z "${NO_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site312 \
      .whl/*.whl || exit 1
    for w in .whl39/*.whl; do python3 -m zipfile -e "$w" /tmp/site39; done
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2; df -h /tmp /dev/shm | tail -2
  # engine builds at once per GPU (NINE_BUILDS_PER_GPU): one per 28 GiB of the GPU's memory (H200: 5, H100: 2)
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  export SLOTS=${NINE_BUILDS_PER_GPU:-$(( ${mem:-81920} / 28672 > 0 ? ${mem:-81920} / 28672 : 1 ))}
  echo "engine builds per GPU at once: $SLOTS"
  PARTS=$(env PYTHONPATH=$PWD:/tmp/site312 python3 -c "import sys
from autoglm_build.config import load_config
from autoglm_build.modules import registry
print(' '.join(registry.expand(load_config(sys.argv[1]), sys.argv[2].split())))" "$N9C" "$NINE_MODULES") \
    || { echo "error: cannot read the parts of $N9C"; exit 1; }
  echo "parts: $PARTS"
  # The jobs' marker files in the workdir must not begin with the tool's temp prefixes (workdir.TEMP_PREFIXES: a
  # run removes those as stale; ".samples-done" was, so the verify jobs waited for ever).
  # an earlier attempt's markers (not the build slots' lock files: a lock lives in its holder's open file, and
  # a build still running from that attempt must keep its slot)
  rm -f "$N9CKPT.done" "$N9CKPT.failed" "$N9"/.optimized-* "$N9"/.failed-* "$N9"/.engine-* "$N9"/.sampled \
    "$N9"/.failed-samples
  stamp='echo "=== $(date +%s) $(date +%T)"'
  job ckpt9 "$stamp ckpt; env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/make_layout_checkpoint.py \
    -c $NINE -o $N9CKPT --workers ${NINE_CKPT_WORKERS:-6} && touch $N9CKPT.done || touch $N9CKPT.failed; $stamp ckpt end"
  verify_wait() {  # verify_wait PATTERN...: the samples, then the engine of each part matching a PATTERN
    local waiting part pattern
    waiting="$(mark_wait $N9/.sampled $N9/.failed-samples);"
    for part in $PARTS; do
      for pattern in "$@"; do
        case $part in $pattern) waiting="$waiting $(mark_wait $N9/.engine-$part $N9/.failed-$part);";; esac
      done
    done
    echo "$waiting"
  }
  c="-c $N9C -w $N9"
  # torch's side of the decoder bench (transformers, the same checkpoint) runs in nine-check, beside TensorRT's:
  # eager torch is launch-bound, and here, beside 17 exports, it measured 2.2x its quiet time (fifth session)
  for part in $PARTS; do
    on_gpu
    data="$N9/onnx/$part.onnx.data"  # the exported FP32 weights: the optimized graph replaces them (disk)
    # a failed checkpoint marks the part failed
    job "part-$part" "$(mark_wait $N9CKPT.done $N9CKPT.failed "touch $N9/.failed-$part") && $stamp export && { $CLI312 export $c -m $part && $stamp optimize \
      && $CLI312 optimize $c -m $part || { touch $N9/.failed-$part; false; }; } \
      && { rm -f $data; touch $N9/.optimized-$part; $stamp fp16; } && $CLI312 calibrate --fp16 $c -m $part && $stamp harness && $HARNESS $stamp engine \
      && gpu_slot '${ON#*=}' $ON $CLI39 engine $c -m $part --precision fp16 && touch $N9/.engine-$part \
      || touch $N9/.failed-$part; $stamp end"
  done
  waits=""  # every part's FP32 graph; a part that failed stops the samples (no wait for ever)
  for part in $PARTS; do
    waits="$waits $(mark_wait $N9/.optimized-$part $N9/.failed-$part "touch $N9/.failed-samples");"
  done
  job samples9 "$waits $stamp samples && env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py $c \
    $(printf -- '-m %s ' $NINE_MODULES) && touch $N9/.sampled || touch $N9/.failed-samples; $stamp samples end"
  if [ -n "${NINE_AUDIO:-}" ]; then
    # the Whisper-large-v3 encoder (32 layers, 1280 wide) beside the rest, seeded random weights (the published
    # GLM-4.1V checkpoint has none), in a workdir of its own so the server's build need not wait for it
    derive "$N9C" "$N9AC" -audio "d['modules'] = ['audio']; d.pop('checkpoint', None)"
    ca="-c $N9AC -w $N9A"; rm -f "$N9A"/.engine-audio
    on_gpu
    job audio9 "$stamp export; $CLI312 export $ca -m audio && $stamp optimize && $CLI312 optimize $ca -m audio \
      && $stamp samples && env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py $ca -m audio \
      && $stamp fp16 && $CLI312 calibrate --fp16 $ca -m audio && $HARNESS $stamp engine \
      && gpu_slot '${ON#*=}' $ON $CLI39 engine $ca -m audio --precision fp16 && touch $N9A/.engine-audio \
      && $stamp verify && $ON $CLI39 verify $ca -m audio --precision fp16 --strict 2>&1 | grep -v '^\[W\]'; $stamp end"
  fi
  # the decoder's and embed's engines against ONNX Runtime (and their FP16 graphs against FP32), as soon as they
  # exist, while the vision tower still builds
  dwait=$(verify_wait "decoder*" embed)
  dmods=""
  for module in $NINE_MODULES; do case $module in decoder|embed) dmods="$dmods -m $module";; esac; done
  if [ -n "$dmods" ]; then
    on_gpu
    job dverify9 "$dwait $stamp verify && $ON $CLI39 verify $c $dmods --precision fp16 --strict 2>&1 | grep -v '^\[W\]'; \
      echo \"verify exit: \${PIPESTATUS[0]}\"; $stamp verify end"
  fi
  case " $NINE_MODULES " in *" vision "*)  # the tower's engines against ONNX Runtime (CPU) as soon as they exist
    vwait=$(verify_wait "vision*")
    on_gpu
    job vverify9 "$vwait $stamp verify && $ON $CLI39 verify $c -m vision --precision fp16 --backend tensorrt --strict \
      2>&1 | grep -v '^\[W\]'; echo \"verify exit: \${PIPESTATUS[0]}\"; $stamp verify end";;
  esac
  exec bash "$0" wait "${2:-0}"
  ;;
nine-lease)  # issue 15's lease in one call: phase nine on every GPU but the last where there are 4 or more with
  # >= 100 GB each and TINY_DIR names the tiny build (issue 14's phase devtests then runs on the last GPU, as a job,
  # on CPUs 0-7, the 9B's jobs on the others); otherwise nine on every GPU. NINE_* pass through.
  n=$(nvidia-smi -L | wc -l); mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  cores=$(nproc); builds=$(seq -s " " 0 $((n - 1))); cpus=0-$((cores - 1))
  if [ "$n" -ge 4 ] && [ "${mem:-0}" -ge 100000 ] && [ -n "${TINY_DIR:-}" ] && [ "$cores" -ge 32 ]; then
    builds=$(seq -s " " 0 $((n - 2))); cpus=8-$((cores - 1))
    GPUS=$((n - 1)) TINY_MODULES="vision embed decoder" TINY_PRECISIONS=fp16 FULL_MODULES= START_WAIT=0 DEVTESTS=1 \
      $(pin 0-7) bash "$0" start "$TINY_DIR" >"$L/start-tiny.log" 2>&1
    echo "tiny devtests on GPU $((n - 1)) (CPUs 0-7): $(grep -c started "$L/start-tiny.log") jobs"
  fi
  echo "9B builds on GPUs $builds, CPUs $cpus"
  GPUS="$builds" exec $(pin "$cpus") bash "$0" nine "${2:-0}"
  ;;
nine-verify)  # the 9B modules' chained engines against ONNX Runtime, and their FP16 graphs against FP32 (CPU)
  $CLI39 verify -c $N9C -w $N9 $(printf -- '-m %s ' $NINE_MODULES) --precision fp16 --strict 2>&1 | grep -v "^\[W\]" | tee "$OUT/verify_9b.txt"
  status=${PIPESTATUS[0]}; echo "verify exit: $status"; exit "$status"
  ;;
nine-twogpu)  # the 9B decoder's stages on GPUs 0 and 1 generate what they generate on GPU 0 (issue 15)
  AUTOGLM_BUILD_TRT_WORKDIR=$N9 PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy -m pytest -q -p no:cacheprovider -rs \
    "tests/runtime/test_backends_trt.py::test_the_staged_decoder_split_across_two_gpus_generates_what_it_does_on_one" \
    2>&1 | grep -v "^\[W\]" | tee "$OUT/pytest_two_gpus_9b.txt" | tail -8
  ;;
nine-check)  # the 9B model's engines: device memory, bench at 40 layers beside torch, the phone agent served
  # One GPU each, at once, where there are enough: the agent's server (AGENT_GPU, the first of GPUS), TensorRT's
  # decoder and vision bench (BENCH_GPU, the second), torch's decoder bench on the same checkpoint (TORCH_GPU, the
  # third; TORCH_CPUS pins it: eager torch is launch-bound); the engines' device memory on the last. Fewer GPUs:
  # the benches one after the other on the last GPU.
  c="-c $N9C -w $N9"
  n=${#GPU_LIST[@]}
  AGENT_GPU=${AGENT_GPU:-${GPU_LIST[0]:-0}}
  BENCH_GPU=${BENCH_GPU:-$([ "$n" -ge 2 ] && echo "${GPU_LIST[1]}" || echo "$LAST_GPU")}
  TORCH_GPU=${TORCH_GPU:-$([ "$n" -ge 3 ] && echo "${GPU_LIST[2]}" || echo "$BENCH_GPU")}
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
  # each engine's activation memory (TensorRT's device_memory_size: what a context needs beside the weights)
  env CUDA_VISIBLE_DEVICES=$LAST_GPU PYTHONPATH=$PWD /tmp/stage/trtpy - "$N9"/engines/*.engine $N9A/engines/*.engine \
    >"$L/engine_memory.txt" 2>&1 <<'PY' &
import sys
import tensorrt as trt
runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
for path in [p for p in sys.argv[1:] if not p.endswith("*.engine")]:  # an unmatched glob: no such engines
    with open(path, "rb") as fh:
        engine = runtime.deserialize_cuda_engine(fh.read())
    print(f"{path.rsplit('/', 1)[-1]}: device memory {engine.device_memory_size / 2**20:,.1f} MiB, "
          f"{engine.num_optimization_profiles} profile(s)", flush=True)
    del engine
PY
  memory=$!
  case " $AGENT_GPU $BENCH_GPU $TORCH_GPU " in  # a GPU that runs something must not share it with the deserializing
    *" $LAST_GPU "*) wait $memory;;
  esac
  pids=""
  case " $NINE_MODULES " in *" vision "*)
    # the phone agent served on the whole model: NINE_AGENT sessions x steps, each step a 1080x2400 screenshot,
    # its system prompt and history, through one server with prefix reuse (a server start takes minutes); beside
    # the benches only on a GPU of its own (its 65 GB and theirs would not fit an H100, and would skew both)
    ( env CUDA_VISIBLE_DEVICES=$AGENT_GPU PYTHONPATH=$PWD:/tmp/site39 timeout ${SERVE_TIMEOUT:-600} /tmp/stage/trtpy \
        benchmarks/serve_load.py $c --backend tensorrt --agent ${NINE_AGENT:-2x2} --agent-tokens 16 --agent-reuse on \
        --ready-timeout 480 --timeout 300 2>&1 | grep -v "^\[W\]" >"$OUT/serve_agent_9b.txt" ) &
    agent=$!
    if [ "$AGENT_GPU" = "$BENCH_GPU" ] || [ "$AGENT_GPU" = "$TORCH_GPU" ]; then wait $agent; else pids="$pids $agent"; fi;;
  esac
  trt_bench="env CUDA_VISIBLE_DEVICES=$BENCH_GPU $CLI39 bench $c -m decoder --backends tensorrt --batches 1,8 \
    --prompt 512 --past $NINE_PAST --min-time 1 --precision fp16"
  case " $NINE_MODULES " in *" vision "*) vision_bench="env CUDA_VISIBLE_DEVICES=$BENCH_GPU $CLI39 bench $c -m vision \
    --backends tensorrt --batches 1 --min-time 1 --precision fp16";; *) vision_bench=true;; esac
  torch_bench="env CUDA_VISIBLE_DEVICES=$TORCH_GPU ${TORCH_CPUS:+taskset -c $TORCH_CPUS} $CLI312 bench $c -m decoder \
    --backends torch --batches 1,8 --prompt 512 --past $NINE_PAST --min-time 1"
  if [ "${NINE_BENCH:-1}" = 1 ]; then
    if [ "$TORCH_GPU" != "$BENCH_GPU" ]; then
      ( $torch_bench 2>&1 | grep -v "^\[W\]" >"$OUT/bench_9b_torch.txt" ) & pids="$pids $!"
      ( { $trt_bench; $vision_bench; } 2>&1 | grep -v "^\[W\]" >"$OUT/bench_9b_trt.txt" ) & pids="$pids $!"
    else
      ( { $trt_bench; $vision_bench; $torch_bench; } 2>&1 | grep -v "^\[W\]" >"$OUT/bench_9b_trt.txt" ) & pids="$pids $!"
    fi
  fi
  for pid in $pids; do wait "$pid"; done
  for f in "$OUT"/bench_9b_*.txt "$OUT"/serve_agent_9b.txt; do [ -e "$f" ] && { echo "--- $(basename "$f")"; tail -40 "$f"; }; done
  for overlap in ${NINE_OVERLAP-}; do  # NINE_OVERLAP="1 0": text-prompt serve/engine runs with the decode overlap on/off
    # the 40-layer server takes about 200 s to start (nine engines, 34 GB): 330 s per run
    AUTOGLM_BUILD_OVERLAP=$overlap CUDA_VISIBLE_DEVICES=$AGENT_GPU PYTHONPATH=$PWD:/tmp/site39 timeout ${SERVE_TIMEOUT:-330} \
      /tmp/stage/trtpy benchmarks/serve_load.py $c --backend tensorrt --clients 0 --max-tokens 32 --ready-timeout 300 2>&1 \
      | grep -v "^\[W\]" | tee "$OUT/serve_load_9b_overlap$overlap.txt"
  done
  wait $memory; grep -v "^\[" "$L/engine_memory.txt" | tee "$OUT/engine_memory_9b.txt"
  for f in "$L"/dverify9.log "$L"/vverify9.log "$L"/audio9.log; do [ -e "$f" ] && cp "$f" "$OUT/"; done
  cp "$N9/manifest.json" "$OUT/manifest_9b.json"
  ;;
ready)  # the harness's parts are all in /tmp/stage: unpack once (about 20 s), then release the builds
  /tmp/stage/trtpy -c "import tensorrt, polygraphy; print('TensorRT', tensorrt.__version__, 'Polygraphy', polygraphy.__version__)" \
    && touch /tmp/stage/.ready
  exec bash "$0" wait "${2:-400}"
  ;;
wait)
  end=$((SECONDS + ${2:-540}))
  jobs_re="[a]utoglm_build.cli|[m]ake_layout_checkpoint|[s]amples_stage"  # the jobs' shells name these too
  while pgrep -f "$jobs_re" >/dev/null && [ $SECONDS -lt $end ]; do sleep 10; done
  pgrep -fa "$jobs_re" | cut -c1-160 || echo "all jobs finished"
  for f in "$L"/*.log; do
    echo "--- $(basename "$f")"; grep -a -E "^===|: done in|rror|FAILED|DCHECK|Killed|cached|peak RSS|Maximum resident" "$f" | grep -v "^\[" | tail -12
  done
  ls -la "$W/engines" "$F/engines" "$FD/engines" "$WS/engines" "$N9/engines" "$N9A/engines" 2>/dev/null | grep -v json | sort -u
  df -h /tmp | tail -1
  tar -czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null; true
  ;;
tiny)
  precisions=$(printf -- "--precision %s " ${TINY_PRECISIONS:-int8})
  $CLI39 verify -c $TINY -w $W --strict $(printf -- "-m %s " $TINY_MODULES) $precisions 2>&1 | grep -v "^\[W\]" \
    | tee "$OUT/verify_tiny.txt"
  echo "verify exit: ${PIPESTATUS[0]}"
  for e in "$W"/engines/*.engine; do  # the engines' I/O types (the decoder's KV cache: FP16 in and out)
    echo "--- $(basename "$e")"; /tmp/stage/trtpy -m polygraphy inspect model "$e" 2>&1 | grep -E "^\s+(past|present|logits|image)" | head -6
  done | tee "$OUT/engine_io_tiny.txt"
  $CLI39 bench -c $TINY -w $W -m vision -m decoder --backends tensorrt,onnxruntime --batches 1,8 --min-time 0.5 \
    2>&1 | grep -v "^\[W\]" | tee "$OUT/bench_tiny.txt"
  ;;
serve)  # the client tests (openai SDK, LangChain) and the error tests on the TensorRT backend, fp16
  AUTOGLM_BUILD_SERVE_BACKEND=tensorrt AUTOGLM_BUILD_SERVE_WORKDIR=$W PYTHONPATH=$PWD:/tmp/site39 \
    /tmp/stage/trtpy -m pytest -q -p no:cacheprovider -rs tests/serve 2>&1 | tee "$OUT/pytest_serve.txt" | tail -8
  grep -h "serving" /tmp/pytest-of-*/*/*/serve-*.log 2>/dev/null | head -2
  ;;
profile)  # where the time goes: TensorRT's per-layer times, and torch.profiler's kernels against the wall clock
  for spec in "decoder fp16 decode 1" "decoder fp16 decode 8" "decoder int8 decode 8" "decoder fp16 prefill 8" \
      "vision fp16 px 8" "vision int8 px 8"; do
    set -- $spec
    PYTHONPATH=$PWD /tmp/stage/trtpy scripts/trt_layer_profile.py -w $F -c $FULL -m $1 --precision $2 \
      --case $3 --batch $4 2>&1 | grep -v "^\[" | tee -a "$OUT/profile.txt"
  done
  for spec in "decoder decode 1" "decoder decode 8" "decoder prefill 1" "vision px 1" "vision px 8"; do
    set -- $spec
    PYTHONPATH=$PWD:/tmp/site312 python3 scripts/torch_profile.py -w $F -c $FULL -m $1 --case $2 --batch $3 2>&1 \
      | grep -v "^USDT" | tee -a "$OUT/profile.txt"
  done
  ;;
overhead)  # how much of a TensorRT call is the host (scripts/trt_call_overhead.py)
  for spec in "decoder decode 1" "decoder decode 8" "decoder prefill 1" "vision px 1" "vision px 8"; do
    set -- $spec
    PYTHONPATH=$PWD /tmp/stage/trtpy scripts/trt_call_overhead.py -w $F -c $FULL -m $1 --precision fp16 \
      --case $2 --batch $3 2>&1 | grep -v "^\[" | tee -a "$OUT/overhead.txt"
  done
  ;;
bench)  # the phone agent's step: one screenshot; prefill of 3,300 new tokens after 3,000; decode at 20,000 (1 and 8 rows)
  ext="--extrapolate-to configs/autoglm-phone-9b.yaml --min-time ${BENCH_MIN_TIME:-1}"
  shapes="--prompt 3300 --prefix 3000 --past 20000"
  precisions=$(printf -- "--precision %s " ${FULL_PRECISIONS:-fp16 int8})
  if [ -n "${VISION_BENCH:-}" ]; then
    $CLI312 bench -c $FULL -w $F -m vision --backends torch --batches 1,8 $ext 2>&1 | tee "$OUT/bench_torch.txt"
    $CLI39 bench -c $FULL -w $F -m vision --backends tensorrt --batches 1,8 $ext $precisions 2>&1 \
      | grep -v "^\[W\]" | tee "$OUT/bench_full.txt"
  fi
  $CLI312 bench -c $FULLD -w $FD -m decoder --backends torch --batches 1,8 $shapes $ext 2>&1 | tee -a "$OUT/bench_torch.txt"
  $CLI39 bench -c $FULLD -w $FD -m decoder --backends tensorrt --batches 1,8 $shapes $ext $precisions 2>&1 \
    | grep -v "^\[W\]" | tee -a "$OUT/bench_full.txt"
  cp "$F/manifest.json" "$OUT/manifest_full.json"; cp "$FD/manifest.json" "$OUT/manifest_full_decoder.json"
  ;;
verify)  # full width: every engine against ONNX Runtime on its own precision graph, real samples
  precisions=$(printf -- "--precision %s " ${FULL_PRECISIONS:-fp16 int8})
  for module in ${FULL_MODULES-vision decoder}; do
    if [ "$module" = decoder ]; then c=$FULLD; w=$FD; else c=$FULL; w=$F; fi
    $CLI39 verify -c $c -w $w -m $module --strict $precisions 2>&1 | grep -v "^\[W\]" | tee -a "$OUT/verify_full.txt"
    echo "verify $module exit: ${PIPESTATUS[0]}"
  done
  ;;
devtests)  # tiny: the TensorRT backend's GPU tests (bound calls, the device-resident KV cache), bench-serve
  # the device-cache tests read the tiny vision samples, which a carried tiny build may leave out for size (37 MB)
  [ -e "$W/samples/vision.npz" ] || env PYTHONPATH=$PWD:/tmp/site312 python3 scripts/samples_stage.py -c $TINY -w $W -m vision
  AUTOGLM_BUILD_TRT_WORKDIR=$W PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy -m pytest -q -p no:cacheprovider -rs \
    tests/runtime/test_backends_trt.py 2>&1 | grep -v "^\[W\]" | tee "$OUT/pytest_trt_tiny.txt" | tail -15
  for ab in ${SERVE_AB-1:0 1:1}; do  # GRAPHS:SELECT (serve.cuda_graphs, serve.device_select): the host's tokens, the GPU's
    graphs=${ab%:*}; select=${ab#*:}
    AUTOGLM_BUILD_CUDA_GRAPHS=$graphs AUTOGLM_BUILD_DEVICE_SELECT=$select PYTHONPATH=$PWD:/tmp/site39 timeout 400 \
      /tmp/stage/trtpy benchmarks/serve_load.py -c $TINY -w $W --backend tensorrt --clients 64 --max-tokens 128 \
      --ready-timeout 300 2>&1 | grep -v "^\[W\]" | tee "$OUT/serve_load_tiny_graphs${graphs}_select$select.txt"
  done
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
  ;;
serveab)  # serve/engine at 8 streams on TensorRT, this tree against the tree in $OLD (the commit before a change), the
  # tiny and the full-width build at once (GPUs TINY_GPU and FULL_GPU), CUDA graphs and device select on, the load
  # phase off; this tree also times the engine with the select engine (--engine-select). uvloop and httptools (this
  # tree's dependencies) are moved out of /tmp/site39 for $OLD's servers. Then, with PYSPY (a py-spy binary), this
  # tree's servers once more under py-spy (spied: raw stacks per thread, tarred into $OUT/spy_ab.tgz)
  OLD=${OLD:-/tmp/old}
  mkdir -p /tmp/site39fast; for p in uvloop httptools; do mv /tmp/site39/$p* /tmp/site39fast/ 2>/dev/null; done
  PYTHONPATH=/tmp/site39 /tmp/stage/trtpy -c "import uvicorn; print('harness uvicorn', uvicorn.__version__)
try:
    import uvloop; print('harness uvloop', uvloop.__version__)
except ImportError: print('harness: no uvloop')"
  ab() {  # ab NAME CONFIG WORKDIR GPU
    local tree dir site extra
    for tree in old new; do
      if [ $tree = old ]; then dir=$OLD; site=/tmp/site39; extra=""; else dir=$PWD; site=/tmp/site39:/tmp/site39fast; extra=--engine-select; fi
      ( cd "$dir" && CUDA_VISIBLE_DEVICES=$4 PYTHONPATH=$dir:$site timeout 400 /tmp/stage/trtpy benchmarks/serve_load.py \
        -c "$2" -w "$3" --backend tensorrt --clients 0 --max-tokens 128 --ready-timeout 300 $extra ) 2>&1 \
        | grep -v "^\[W\]" >"$OUT/serve_ab_$1_$tree.txt"
    done
    [ -n "${PYSPY:-}" ] || return 0
    mkdir -p "/tmp/spy-ab/$1"
    CUDA_VISIBLE_DEVICES=$4 spied /tmp/site39:/tmp/site39fast "/tmp/spy-ab/$1" --idle "$2" "$3" --max-tokens 128
  }
  rm -rf /tmp/spy-ab
  ab tiny "$TINY" "$W" "${TINY_GPU:-3}" & a=$!
  ab full "$FULLD" "$FD" "${FULL_GPU:-0}" & b=$!
  wait $a; wait $b
  [ -d /tmp/spy-ab ] && tar czf "$OUT/spy_ab.tgz" -C /tmp/spy-ab .
  for f in "$OUT"/serve_ab_*.txt /tmp/spy-ab/*/serve_load.txt; do [ -e "$f" ] && echo "--- $f" && tail -9 "$f"; done
  ;;
tinyserve)  # tiny: serve/engine on TensorRT (CUDA graphs and device select on), once per serve.stream_interval_ms in
  # INTERVALS (default "0 5"; an interval listed again runs again), each with --engine-select and serve_load's default
  # 3 runs per rate; each run's output in a file of its own (serve_tiny_interval<ms>_run<k>.txt)
  k=0
  for ms in ${INTERVALS:-0 5}; do
    k=$((k + 1)); out="$OUT/serve_tiny_interval${ms}_run$k.txt"
    AUTOGLM_BUILD_STREAM_INTERVAL_MS=$ms PYTHONPATH=$PWD:/tmp/site39 timeout 400 /tmp/stage/trtpy benchmarks/serve_load.py \
      -c $TINY -w $W --backend tensorrt --clients 0 --max-tokens ${TOKENS:-128} --ready-timeout 300 --engine-select 2>&1 \
      | grep -v "^\[W\]" >"$out"
    echo "--- run $k, stream interval $ms ms"; tail -9 "$out"
  done
  ;;
spy)  # tiny (or SPY_CONFIG/SPY_WORKDIR): where a served decode step's host time goes, on TensorRT. serve_load (8
  # streams, CUDA graphs and device select on) with py-spy attached to its server (raw stacks per thread, sampled at
  # 250 Hz; SPY: the py-spy binary, default the one .whl39's py-spy wheel unpacks), then the engine alone with the
  # select engine (--engine-only --engine-select) under cProfile, its functions by own time. Stacks are written
  # outside $OUT and tarred into $OUT/spy.tgz: a call brings back only so many files
  c=${SPY_CONFIG:-$TINY}; w=${SPY_WORKDIR:-$W}; S=/tmp/spy; rm -rf $S; mkdir -p $S
  PYSPY=${SPY:-/tmp/site39/py_spy-0.4.1.data/scripts/py-spy}; chmod +x "$PYSPY" 2>/dev/null
  run39="env PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy"
  # SPY_GIL=1: only the thread holding the GIL is sampled (who runs Python, not who waits for it)
  mode=--idle; [ -n "${SPY_GIL:-}" ] && mode=--gil
  spied /tmp/site39 $S $mode "$c" "$w" --max-tokens ${SPY_TOKENS:-512}
  $run39 -m cProfile -s tottime benchmarks/serve_load.py -c $c -w $w --backend tensorrt --engine-only --engine-select \
    --max-tokens ${SPY_TOKENS:-512} 2>&1 | grep -v "^\[W\]" | head -60 >$S/engine_profile.txt
  tar czf "$OUT/spy.tgz" -C $S .
  tail -12 $S/serve_load.txt; head -40 $S/engine_profile.txt
  ;;
serveload)  # full width: bench-serve (1 and 8 streams), then the agent load with and without reuse beside generate
  mem=$(mktemp); nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 >"$mem" &
  for select in ${SELECT_AB-0 1}; do  # serve.device_select off (the host samples), then on (the GPU chooses)
    AUTOGLM_BUILD_DEVICE_SELECT=$select PYTHONPATH=$PWD:/tmp/site39 timeout ${SERVE_TIMEOUT:-400} /tmp/stage/trtpy \
      benchmarks/serve_load.py -c $FULLD -w $FD --backend tensorrt --clients ${CLIENTS:-32} --max-tokens 128 \
      --ready-timeout 300 2>&1 | grep -v "^\[W\]" | tee "$OUT/serve_load_full_select$select.txt"
  done
  while pgrep -f "[a]gent_generate.py" >/dev/null; do sleep 5; done  # start's baseline job, if it is still running
  [ -e "$L/baseline.log" ] && tail -20 "$L/baseline.log" >"$OUT/agent_generate.txt"
  if [ -n "${CHECKPOINT:-}" ] && [ -z "${NO_BASELINE:-}" ] && [ ! -s "$D/agent_generate.json" ]; then  # transformers'
    # generate, same weights, on this GPU (start's BASELINE_GPU job ran it on a GPU of its own already, if set)
    PYTHONPATH=$PWD:/tmp/site312 timeout ${BASELINE_TIMEOUT:-200} python3 benchmarks/agent_generate.py -c $FULLD \
      --checkpoint $CKPT --agent ${AGENT:-8x5} --agent-tokens 32 --json "$D/agent_generate.json" 2>&1 | tail -20 \
      | tee "$OUT/agent_generate.txt"
  fi
  baseline=""; [ -s "$D/agent_generate.json" ] && baseline="--baseline $D/agent_generate.json"
  PYTHONPATH=$PWD:/tmp/site39 timeout ${AGENT_TIMEOUT:-300} /tmp/stage/trtpy benchmarks/serve_load.py -c $FULLD -w $FD \
    --backend tensorrt --agent ${AGENT:-8x5} --agent-tokens 32 --ready-timeout 300 $baseline 2>&1 | grep -v "^\[W\]" \
    | tee "$OUT/agent_full.txt"
  kill %1; python3 - "$mem" <<'PY' | tee "$OUT/gpu_memory_full.txt"
import collections, sys
seen = collections.defaultdict(list)
for line in open(sys.argv[1]):
    gpu, used = (int(x) for x in line.split(","))
    seen[gpu].append(used)
for gpu, used in sorted(seen.items()):
    print(f"GPU {gpu} memory used during serveload (MiB): first {used[0]}, peak {max(used)}, last {used[-1]}")
PY
  ;;
twogpu)  # issue 15: the staged tiny decoder on GPUs 0 and 1 generates what it generates on GPU 0; a chat served so
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  AUTOGLM_BUILD_TRT_WORKDIR=$WS PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy -m pytest -q -p no:cacheprovider -rs \
    "tests/runtime/test_backends_trt.py::test_the_staged_decoder_split_across_two_gpus_generates_what_it_does_on_one" \
    2>&1 | grep -v "^\[W\]" | tee "$OUT/pytest_two_gpus.txt" | tail -8
  if [ -n "${TWO_GPU_FULL:-}" ]; then  # the same on the full-width slice's two stages
    AUTOGLM_BUILD_TRT_WORKDIR=$FD PYTHONPATH=$PWD:/tmp/site39 /tmp/stage/trtpy -m pytest -q -p no:cacheprovider -rs \
      "tests/runtime/test_backends_trt.py::test_the_staged_decoder_split_across_two_gpus_generates_what_it_does_on_one" \
      2>&1 | grep -v "^\[W\]" | tee "$OUT/pytest_two_gpus_full.txt" | tail -8
  fi
  ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
