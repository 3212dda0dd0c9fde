#!/usr/bin/env bash
# The benchmarks on a GPU machine, in one run (JAX backend unless KERAS_BACKEND says otherwise).
#
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [CIFAR_DIR]
#   OUT_DIR    where the logs and the two run files of the reference pair go
#   CIFAR_DIR  a cifar-10-batches-py folder (default: ../shared/data/cifar-10-batches-py-subset)
#   QUICK=1    tiny sizes, to check the script itself on a CPU
#   PARTS="depth per_step"  only these parts (default: depth per_step overhead experiment;
#              first_run, first_run.py: the first capture from outside in fresh processes, compiled
#              beside or after Keras's first step;
#              range_maps, the capture with and without the ReLU range maps, compile_options,
#              XLA options for compiling the capture, and depth_options, depth.py with the
#              capture compiled with the set GPU_OPTIONS names, and write, write_speed.py: the
#              write and what it costs a Python-bound step beside it, only when named)
#
# Each part has its own time limit, so one that runs long cannot eat the others' time (one call
# of a 15-minute GPU lease runs at most 600 s). On an H100 (2026-11-26, fifth session)
# depth.py took 194 s (two one-step fits of fresh models per model for the first capture counted
# from outside; ResNet50 before MobileNetV2, whose compiles are the longest), per_step.py 138 s
# for the two reference CNNs with --breakdown on 32768 images (epochs of 1,024 steps of 2 ms:
# shorter ones swung from 0.85 to 1.57), overhead.py 63 s, the reference pair 61 s. In the
# seventh session depth.py took longer (Keras's own first MobileNetV2 step compiled for 32 s
# against 25 s): 251 s for four models, 133 s for MobileNetV2 alone, so its limit is now 400 s
# and the default parts no longer fit one call: name PARTS (depth plus one of the others, or
# per_step overhead experiment). compile_options.py took 170 s for BN and two MobileNetV2 sets.
# README's GPU table comes from these logs. DEPTH_ARGS, PER_STEP_ARGS, FIRST_RUN_ARGS and OVERHEAD_ARGS replace
# those parts' arguments, DEPTH_LIMIT and FIRST_RUN_LIMIT their limits, to fit a call
# (MobileNetV2's three fresh processes in first_run.py took over 330 s on an H100: give it a call
# of its own, e.g. FIRST_RUN_ARGS="--models mobilenetv2" FIRST_RUN_LIMIT=560). The tenth session
# ran PARTS="first_run depth per_step" DEPTH_ARGS="--models baseline bn mobilenetv2 --repeats 3
# --per-step-pairs 0" DEPTH_LIMIT=230 PER_STEP_ARGS="--models baseline bn --images 32768 --rounds 1
# --epochs 2". Not yet run on a GPU: where the per-step statistics are cheaper there, in the step
# or handed out to numpy, e.g. PARTS=per_step PER_STEP_ARGS="--models baseline bn --images 4096
# --paired 200 --statistics device", then the same with "--statistics host".
# Nor what step captures cost a fit now that Keras's loop runs ahead of them (nineteenth
# session): PARTS=overhead OVERHEAD_ARGS="--models baseline bn --images 20000 --epochs 2
# --side-by-side 2 --every-n-steps 50".
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_suite.sh OUT_DIR [CIFAR_DIR]}")
data=$(realpath -m "${2:-../shared/data/cifar-10-batches-py-subset}")
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax} TF_CPP_MIN_LOG_LEVEL=3
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out/runs"

if [ "${QUICK:-0}" = 1 ]; then
  depth=(--models baseline lstm --repeats 2); per_step=(--models baseline --images 256 --rounds 1 --epochs 1 --breakdown)
  overhead=(--models baseline --images 256 --epochs 1 --side-by-side 1); epochs=2
  range_maps=(--models baseline --rounds 3); compile_options=(--models baseline --runs 3)
  depth_options=(--models baseline --repeats 2); write=(--models bn --captures 20)
  first_run=(--models baseline)
else
  depth=(--models baseline bn lstm resnet50 mobilenetv2 --repeats 3)
  per_step=(--models baseline bn --images 32768 --rounds 2 --epochs 2 --breakdown)
  overhead=(--images 20000 --epochs 2 --side-by-side 2); epochs=5
  range_maps=(--models baseline bn mobilenetv2 --rounds 25); compile_options=(--models bn mobilenetv2 --runs 10)
  depth_options=(--models bn mobilenetv2 --repeats 3); write=(--models bn mobilenetv2 --captures 50)
  first_run=(--models bn mobilenetv2)
fi
if [ -n "${DEPTH_ARGS:-}" ]; then read -ra depth <<< "$DEPTH_ARGS"; fi
if [ -n "${PER_STEP_ARGS:-}" ]; then read -ra per_step <<< "$PER_STEP_ARGS"; fi
if [ -n "${FIRST_RUN_ARGS:-}" ]; then read -ra first_run <<< "$FIRST_RUN_ARGS"; fi
if [ -n "${OVERHEAD_ARGS:-}" ]; then read -ra overhead <<< "$OVERHEAD_ARGS"; fi
parts=" ${PARTS:-depth per_step overhead experiment} "

part() {  # part NAME SECONDS COMMAND...: run it under a limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  [[ $parts == *" $name "* ]] || return 0
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import keras, platform; print('python', platform.python_version(), '| keras', keras.__version__, keras.backend.backend())"
  if [ "$KERAS_BACKEND" = jax ]; then "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"; fi
} 2>&1 | tee "$out/device.log"

cd "$root/benchmarks"
part first_run "${FIRST_RUN_LIMIT:-240}" "$py" first_run.py "${first_run[@]}"
part depth "${DEPTH_LIMIT:-400}" "$py" depth.py "${depth[@]}"
part per_step 180 "$py" per_step.py "${per_step[@]}"
part overhead 70 "$py" overhead.py "${overhead[@]}"
part range_maps 120 "$py" range_maps.py "${range_maps[@]}"
part compile_options 170 "$py" compile_options.py "${compile_options[@]}"
part depth_options 150 "$py" depth.py "${depth_options[@]}" --gpu-options "${GPU_OPTIONS:-default}"
part write 150 "$py" write_speed.py "${write[@]}"
# The reference pair on real CIFAR-10 images, per-step rows every 10 steps and the gradient shift.
part experiment 70 "$py" -m icsviz.cli experiment --data-dir "$data" --epochs "$epochs" \
  --batch-stats 10 --gradient-shift --out-dir "$out/runs" --overwrite
