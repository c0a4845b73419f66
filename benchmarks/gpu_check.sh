#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (torch >= 2.3, no network) that finishes within about
# 8 minutes on an H100/H200 and prints one summary line per item (lines starting "GPU-CHECK"):
#   (a) the CUDA-only tests (pytest -m cuda) and the autocast/step-loop tests;
#   (b) emp_ssl/cifar10_1epoch for one full epoch (bf16 autocast, channels_last): train seconds,
#       patches/s, peak memory; the step-time breakdown (benchmarks/train_step.py); and whether
#       train.compile pays for its compile time (a compiled run of --compile-steps steps);
#   (c) the paper's evaluation of that run: bag of 128 patches of pre_feature + full image, linear
#       probe (weight decay and epochs chosen on the validation split) and k-NN;
#   (d) the view benchmark (benchmarks/views.py) on the CIFAR-10 images, 100 and 1,000 per call;
#   (e) the JPEG-at-rest benchmark (benchmarks/decode.py, generated ~500x375 JPEGs, 100 images x 20 views
#       of 224x224): views rendered on the GPU from host decodes and from nvJPEG decodes.
#
# Data: CIFAR-10 prepared from cifar10-jpeg.npz (the shared datasets' copy), found at $CIFAR_NPZ, else
# data/cifar10-jpeg.npz (carry it to the GPU machine), else ../shared/datasets/cifar10/cifar10-jpeg.npz.
# Outputs (logs, JSON, the run directory) go to $OUT (default gpu_check_out/).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # on a CPU: tiny network and data, a few steps; checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" ONEPOCH_PROGRESS=0
summary() { echo "GPU-CHECK $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

summary "device: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU)", "| torch", torch.__version__)')"

# --- data ---------------------------------------------------------------------------------------
NPZ=${CIFAR_NPZ:-}
for candidate in data/cifar10-jpeg.npz ../shared/datasets/cifar10/cifar10-jpeg.npz; do
  [ -z "$NPZ" ] && [ -f "$candidate" ] && NPZ=$candidate
done
if [ -z "$NPZ" ]; then
  summary "data: cifar10-jpeg.npz not found (set CIFAR_NPZ or copy it to data/cifar10-jpeg.npz)"; exit 1
fi
DATA=${DATA:-data/cifar10}
t0=$SECONDS
$PY -m onepoch prepare npz --source "$NPZ" --out "$DATA" > "$OUT/prepare.log" 2>&1 \
  || { summary "data: prepare failed, see $OUT/prepare.log"; tail -3 "$OUT/prepare.log"; exit 1; }
summary "data: $DATA ready in $((SECONDS - t0)) s"

if [ $SMOKE = 1 ]; then
  TINY="model.arch=resnet10 model.width=0.125 method.pre_feature=64 method.projector=64-32 views.count=4
        data.limit=400 data.test_limit=200 eval.batch_size=100 eval.bag_patches=8 eval.linear_epochs=[2]
        eval.linear_weight_decays=[0.0] train.checkpoint_every=1000"
  TESTS_CUDA=""
  TESTS="tests/test_precision.py -k views_inside"
  COMPILE_STEPS=0
  VIEW_ARGS="--smoke"
  STEP_ARGS="--smoke"
else
  TINY=""
  TESTS_CUDA="-m cuda"
  TESTS="tests/test_precision.py tests/test_step_loop.py"
  COMPILE_STEPS=${COMPILE_STEPS:-150}
  VIEW_ARGS=""
  STEP_ARGS="--steps 20 --rounds 3"
fi

# --- (a) tests ------------------------------------------------------------------------------------
if $PY -c "import pytest" 2>/dev/null; then
  if [ -n "$TESTS_CUDA" ]; then
    $PY -m pytest -q -p no:cacheprovider -rs $TESTS_CUDA > "$OUT/tests_cuda.log" 2>&1
    summary "(a) CUDA-only tests: exit $? -- $(grep -E 'passed|failed|error' "$OUT/tests_cuda.log" | tail -1)"
  fi
  $PY -m pytest -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
  summary "(a) autocast and step-loop tests: exit $? -- $(grep -E 'passed|failed|error' "$OUT/tests.log" | tail -1)"
else
  summary "(a) tests: pytest is not installed here"
fi

# --- (b) one epoch --------------------------------------------------------------------------------
cat > "$OUT/epoch.py" <<'EOF'
"""One training run of a recipe, with its wall time, rate and peak device memory as JSON."""
import json, sys, time
import torch
from onepoch.runconfig import load_config
from onepoch.train import train
out, recipe, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(recipe, overrides)
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
r = train(config, progress_bar=False)
wall = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
json.dump({"run_dir": str(r.run_dir), "steps": r.steps, "train_seconds": r.seconds, "wall_seconds": wall,
           "patches_per_s": r.patches_per_s, "final_loss": r.final_loss, "peak_gib": peak,
           "online_probe_test_acc": r.online_probe_test_acc}, open(out, "w"), indent=2)
EOF
RECIPE=emp_ssl/cifar10_1epoch
COMMON="data.root=$DATA train.out=$OUT/runs train.log_every=50 $TINY"
$PY "$OUT/epoch.py" "$OUT/epoch.json" $RECIPE $COMMON name=epoch $([ $SMOKE = 1 ] && echo train.max_steps=3) \
  > "$OUT/epoch.log" 2>&1
if [ -f "$OUT/epoch.json" ]; then
  summary "(b) epoch: $($PY -c "import json; r = json.load(open('$OUT/epoch.json')); print(f\"{r['steps']} steps in {r['train_seconds']:.1f} s of training ({r['wall_seconds']:.1f} s with set-up and the online probe's test pass), {r['patches_per_s']:,.0f} patches/s, peak {r['peak_gib']:.1f} GiB, final loss {r['final_loss']:.3f}, online probe {r['online_probe_test_acc']}\")")"
else
  summary "(b) epoch: failed -- $(tail -1 "$OUT/epoch.log")"
fi
$PY benchmarks/train_step.py --recipe $RECIPE $STEP_ARGS --json "$OUT/train_step.json" > "$OUT/train_step.log" 2>&1
summary "(b) step breakdown: $(tail -1 "$OUT/train_step.log")"
summary "(b) step pipelined: $(grep 'channels_last (default)' "$OUT/train_step.log" | sed 's/^ *//')"
if [ "$COMPILE_STEPS" -gt 0 ]; then
  $PY "$OUT/epoch.py" "$OUT/compiled.json" $RECIPE $COMMON name=compiled train.compile=true \
    train.max_steps=$COMPILE_STEPS train.online_probe=false > "$OUT/compiled.log" 2>&1
  $PY "$OUT/epoch.py" "$OUT/eager.json" $RECIPE $COMMON name=eager \
    train.max_steps=$COMPILE_STEPS train.online_probe=false > "$OUT/eager.log" 2>&1
  summary "(b) compile: $($PY -c "
import json
c, e = json.load(open('$OUT/compiled.json')), json.load(open('$OUT/eager.json'))
print(f\"{c['steps']} steps: compiled {c['train_seconds']:.1f} s (compile included) vs eager {e['train_seconds']:.1f} s\")" 2>&1 | tail -1)"
fi

# --- (c) the paper's evaluation -------------------------------------------------------------------
if [ -f "$OUT/epoch.json" ]; then
  t0=$SECONDS
  $PY -m onepoch eval "$OUT/runs/epoch" > "$OUT/eval.log" 2>&1
  code=$?
  summary "(c) eval: exit $code in $((SECONDS - t0)) s -- $($PY -c "
import json
r = json.load(open('$OUT/runs/epoch/eval.json'))['results']
print('; '.join(f\"{k}: \" + ', '.join(f\"{p} test {100 * v['test_acc']:.2f} % (val {100 * v['val_acc']:.2f} %)\" for p, v in e.items() if isinstance(v, dict) and 'test_acc' in v) for k, e in r.items()))" 2>&1 | tail -1)"
fi

# --- (d) views ------------------------------------------------------------------------------------
$PY benchmarks/views.py --data "$DATA" $VIEW_ARGS --json "$OUT/views.json" > "$OUT/views.log" 2>&1
summary "(d) views, 100 images/call: $(grep 'onepoch.views batched' "$OUT/views.log" | head -1 | sed 's/  */ /g')"
if [ $SMOKE = 0 ]; then
  $PY benchmarks/views.py --data "$DATA" --batch 1000 --json "$OUT/views1000.json" > "$OUT/views1000.log" 2>&1
  summary "(d) views, 1000 images/call: $(grep 'onepoch.views batched' "$OUT/views1000.log" | head -1 | sed 's/  */ /g')"
fi
# --- (e) JPEG at rest -----------------------------------------------------------------------------
DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
$PY benchmarks/decode.py --device $DEVICE $([ $SMOKE = 1 ] && echo --smoke) --json "$OUT/decode.json" \
  > "$OUT/decode.log" 2>&1
summary "(e) decode: $(grep -E '^onepoch' "$OUT/decode.log" | sed 's/  */ /g' | paste -sd ';' -)"
echo "---- summary ($OUT/summary.txt) ----"
cat "$OUT/summary.txt"
