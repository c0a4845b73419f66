#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine (torch >= 2.3, no network). It prints one summary line
# per item (lines starting "GPU-CHECK"), most important first, each item under its own time limit so
# that one slow item cannot starve the rest:
#   (a) the CUDA-only tests (pytest -m cuda) and the autocast/step-loop tests;
#   (b) emp_ssl/cifar10_1epoch for one full epoch (bf16 autocast, channels_last): train seconds,
#       patches/s, peak memory;
#   (c) the paper's evaluation of that run: bag of 128 patches of pre_feature + full image, linear
#       probe (weight decay and epochs chosen on the validation split) and k-NN;
#   (d) the JPEG-at-rest benchmark (benchmarks/decode.py, generated ~500x375 JPEGs, 100 images x 20 views
#       of 224x224): views rendered on the GPU from host decodes and from nvJPEG decodes;
#   (e) the view benchmark (benchmarks/views.py) on the CIFAR-10 images, 100 and 1,000 per call;
#   (f) the step-time breakdown (benchmarks/train_step.py);
#   (g) whether train.compile pays for its compile time (--compile-steps steps compiled against eager).
#
# Data: CIFAR-10 prepared from cifar10-jpeg.npz (the shared datasets' copy), found at $CIFAR_NPZ, else
# data/cifar10-jpeg.npz (carry it to the GPU machine), else ../shared/datasets/cifar10/cifar10-jpeg.npz.
# Logs, JSON and run directories go to $WORK (default gpu_check_out/). Where $OUT names another folder
# (the device tool's), the summary and one archive of the logs and results (gpu_check.tar.gz, no
# checkpoints) are copied there after every item, so a run cut short still returns what it finished.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # on a CPU: tiny network and data, a few steps; checks the script
#
# --reproduce runs instead the reproduction of EMP-SSL's one-epoch headline (docs/reproducing_emp_ssl.md), within
# about 10 minutes of an H100/H200: emp_ssl/cifar10_1epoch (the 84.2 % command's schedule) for one epoch in fp32
# (train.amp=off, as the official code) and in bf16 autocast, each evaluated with `onepoch eval --protocol both`
# (one bag-of-128 embedding shared by EMP-SSL's official probes and onepoch's; onepoch's also on `full`),
# one line per cell:
#   bash benchmarks/gpu_check.sh --reproduce [--smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
REPRODUCE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --reproduce) REPRODUCE=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --smoke, --reproduce)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WORK=${WORK:-gpu_check_out}
OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" ONEPOCH_PROGRESS=0
pack() {  # the summary and an archive of logs and results (no checkpoints) into $OUT, if it is elsewhere
  [ "$(cd "$OUT" && pwd)" = "$(cd "$WORK" && pwd)" ] && return
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  (cd "$WORK" && find . -type f ! -name '*.pt' ! -name '*.safetensors' -print0 \
     | tar czf "$OUT/gpu_check.tar.gz.tmp" --null -T - && mv "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz")
}
summary() { echo "GPU-CHECK $*" | tee -a "$WORK/summary.txt"; pack; }
limited() {  # limited SECONDS LOG COMMAND...: run COMMAND with its output in LOG, killed after SECONDS
  local seconds=$1 log=$2; shift 2
  timeout --kill-after=10 "$seconds" "$@" > "$log" 2>&1
  local code=$?
  [ $code = 124 ] && echo "(stopped after its limit of $seconds s)" >> "$log"
  return $code
}
: > "$WORK/summary.txt"

summary "device: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU)", "| torch", torch.__version__)') | $(nproc) CPU cores"

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
limited 300 "$WORK/prepare.log" $PY -m onepoch prepare npz --source "$NPZ" --out "$DATA" \
  || { summary "data: prepare failed, see $WORK/prepare.log"; tail -3 "$WORK/prepare.log"; exit 1; }
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
  COMPILE_STEPS=${COMPILE_STEPS:-100}
  VIEW_ARGS=""
  STEP_ARGS="--steps 20 --rounds 3"
fi

cat > "$WORK/epoch.py" <<'PYEOF'
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
PYEOF

# --- (r) the reproduction of the one-epoch headline -----------------------------------------------
if [ $REPRODUCE = 1 ]; then
  REPRO_RECIPE=emp_ssl/cifar10_1epoch
  REPRO_EVAL=""
  [ $SMOKE = 1 ] && REPRO_EVAL="eval.bag_patches=4 eval.linear_epochs=[2] eval.linear_weight_decays=[0.0]"
  for amp in off bf16; do
    cell=$([ $amp = off ] && echo fp32 || echo bf16)
    t0=$SECONDS
    rm -rf "$WORK/runs/repro_$cell" "$WORK/repro_$cell.json"
    limited 270 "$WORK/repro_$cell.log" $PY "$WORK/epoch.py" "$WORK/repro_$cell.json" $REPRO_RECIPE \
      data.root=$DATA train.out=$WORK/runs train.log_every=50 name=repro_$cell train.amp=$amp $TINY \
      $([ $SMOKE = 1 ] && echo train.max_steps=3)
    if [ ! -f "$WORK/repro_$cell.json" ]; then
      summary "(r) $cell: training failed after $((SECONDS - t0)) s -- $(tail -1 "$WORK/repro_$cell.log")"; continue
    fi
    t1=$SECONDS
    limited 270 "$WORK/repro_${cell}_eval.log" $PY -m onepoch eval "$WORK/runs/repro_$cell" --protocol both $REPRO_EVAL
    code=$?
    summary "(r) $cell: exit $code, eval $((SECONDS - t1)) s -- $($PY -c "
import json
t = json.load(open('$WORK/repro_$cell.json'))
r = json.load(open('$WORK/runs/repro_$cell/eval.json'))['results']
b, f = r['bag'], r.get('full', {})
pct = lambda e, k='test_acc': f\"{100 * e[k]:.2f}\" if e else '-'
print(f\"train {t['train_seconds']:.1f} s ({t['patches_per_s']:,.0f} patches/s, peak {t['peak_gib']:.1f} GiB); \"
      f\"paper protocol, bag of {b['patches']}: linear best epoch {pct(b['paper_linear'], 'best_test_acc')} % \"
      f\"(chosen on test, the paper's way; epoch {b['paper_linear']['best_epoch']}), last epoch {pct(b['paper_linear'])} %, \"
      f\"k-NN {pct(b['paper_knn'])} %; onepoch protocol (validation-chosen): bag linear {pct(b.get('linear'))} %, \"
      f\"k-NN {pct(b.get('knn'))} %; full linear {pct(f.get('linear'))} %, k-NN {pct(f.get('knn'))} %\")" 2>&1 | tail -1)"
  done
  echo "---- summary ($WORK/summary.txt) ----"
  cat "$WORK/summary.txt"
  exit 0
fi

# --- (a) tests ------------------------------------------------------------------------------------
if $PY -c "import pytest" 2>/dev/null; then
  if [ -n "$TESTS_CUDA" ]; then
    # 300 s: tests/test_cuda_paths.py adds a train.compile run (inductor's first compile) and 4 short runs
    limited 300 "$WORK/tests_cuda.log" $PY -m pytest -q -p no:cacheprovider -rs $TESTS_CUDA
    summary "(a) CUDA-only tests: exit $? -- $(grep -E 'passed|failed|error' "$WORK/tests_cuda.log" | tail -1)"
  fi
  limited 150 "$WORK/tests.log" $PY -m pytest -q -p no:cacheprovider $TESTS
  summary "(a) autocast and step-loop tests: exit $? -- $(grep -E 'passed|failed|error' "$WORK/tests.log" | tail -1)"
else
  summary "(a) tests: pytest is not installed here"
fi

# --- (b) one epoch --------------------------------------------------------------------------------
RECIPE=emp_ssl/cifar10_1epoch
COMMON="data.root=$DATA train.out=$WORK/runs train.log_every=50 $TINY"
t0=$SECONDS
limited 300 "$WORK/epoch.log" $PY "$WORK/epoch.py" "$WORK/epoch.json" $RECIPE $COMMON name=epoch \
  $([ $SMOKE = 1 ] && echo train.max_steps=3)
if [ -f "$WORK/epoch.json" ]; then
  summary "(b) epoch: $($PY -c "import json; r = json.load(open('$WORK/epoch.json')); print(f\"{r['steps']} steps in {r['train_seconds']:.1f} s of training ({r['wall_seconds']:.1f} s with set-up and the online probe's test pass), {r['patches_per_s']:,.0f} patches/s, peak {r['peak_gib']:.1f} GiB, final loss {r['final_loss']:.3f}, online probe {r['online_probe_test_acc']}\")")"
else
  summary "(b) epoch: failed after $((SECONDS - t0)) s -- $(tail -1 "$WORK/epoch.log")"
fi

# --- (c) the paper's evaluation -------------------------------------------------------------------
if [ -f "$WORK/epoch.json" ]; then
  t0=$SECONDS
  # The probe's epoch grid reaches 100 (the official code trains its probe 100 epochs; on the CPU comparison's
  # EMP-SSL run the validation split chose 100 over 30 for `full`, and the GPU run of 2026-11-30 chose 30,
  # the largest of {10, 30}, for both features); the validation split chooses.
  EPOCH_GRID="eval.linear_epochs=[10,30,100]"
  [ $SMOKE = 1 ] && EPOCH_GRID=""
  limited 300 "$WORK/eval.log" $PY -m onepoch eval "$WORK/runs/epoch" $EPOCH_GRID
  code=$?
  summary "(c) eval: exit $code in $((SECONDS - t0)) s -- $($PY -c "
import json
r = json.load(open('$WORK/runs/epoch/eval.json'))['results']
print('; '.join(f\"{k}: \" + ', '.join(f\"{p} test {100 * v['test_acc']:.2f} % (val {100 * v['val_acc']:.2f} %, {v.get('chosen')})\" for p, v in e.items() if isinstance(v, dict) and 'test_acc' in v) for k, e in r.items()))" 2>&1 | tail -1)"
fi

# --- (d) JPEG at rest -----------------------------------------------------------------------------
DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
limited 150 "$WORK/decode.log" $PY benchmarks/decode.py --device $DEVICE $([ $SMOKE = 1 ] && echo --smoke) \
  --json "$WORK/decode.json"
summary "(d) decode: $(grep -E '^(onepoch|per-sample|decode per)' "$WORK/decode.log" | sed 's/  */ /g' | paste -sd ';' -)"

# --- (e) views ------------------------------------------------------------------------------------
limited 60 "$WORK/views.log" $PY benchmarks/views.py --data "$DATA" $VIEW_ARGS --json "$WORK/views.json"
summary "(e) views, 100 images/call: $(grep 'onepoch.views batched' "$WORK/views.log" | head -1 | sed 's/  */ /g')"
if [ $SMOKE = 0 ]; then
  # (its Pillow and torchvision references take 5-11 s per call of 1,000 images, five rounds each)
  limited 150 "$WORK/views1000.log" $PY benchmarks/views.py --data "$DATA" --batch 1000 --json "$WORK/views1000.json"
  summary "(e) views, 1000 images/call: $(grep 'onepoch.views batched' "$WORK/views1000.log" | head -1 | sed 's/  */ /g')"
fi

# --- (f) step breakdown ---------------------------------------------------------------------------
limited 120 "$WORK/train_step.log" $PY benchmarks/train_step.py --recipe $RECIPE $STEP_ARGS --json "$WORK/train_step.json"
summary "(f) step breakdown: $(tail -1 "$WORK/train_step.log")"
summary "(f) step pipelined: $(grep 'channels_last (default)' "$WORK/train_step.log" | sed 's/^ *//')"

# --- (g) compile ----------------------------------------------------------------------------------
if [ "$COMPILE_STEPS" -gt 0 ]; then
  limited 200 "$WORK/compiled.log" $PY "$WORK/epoch.py" "$WORK/compiled.json" $RECIPE $COMMON name=compiled \
    train.compile=true train.max_steps=$COMPILE_STEPS train.online_probe=false
  limited 100 "$WORK/eager.log" $PY "$WORK/epoch.py" "$WORK/eager.json" $RECIPE $COMMON name=eager \
    train.max_steps=$COMPILE_STEPS train.online_probe=false
  summary "(g) compile: $($PY -c "
import json
c, e = json.load(open('$WORK/compiled.json')), json.load(open('$WORK/eager.json'))
print(f\"{c['steps']} steps: compiled {c['train_seconds']:.1f} s (compile included) vs eager {e['train_seconds']:.1f} s\")" 2>&1 | tail -1)"
fi
echo "---- summary ($WORK/summary.txt) ----"
cat "$WORK/summary.txt"
