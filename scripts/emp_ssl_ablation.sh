#!/usr/bin/env bash
# The CPU-scale ablation of docs/reproducing_emp_ssl.md: emp_ssl/cifar10_cpu for one epoch, each factor
# changed alone against today's recipe, two seeds per cell, evaluated with onepoch's protocol (--eval: the
# recipe's grid and full features, linear and k-NN probes chosen on the validation split). The paper
# protocol is run afterwards on the same checkpoints (docs/reproducing_emp_ssl.md gives the command).
# Resumes cell by cell: a run with eval.json is skipped, a cut-short run is resumed. Embeddings are float32
# (eval.amp=off), as they were for every cell: eval.amp=auto embeds in bf16 on CPUs with AMX.
#
#   DATA=data ONEPOCH="onepoch" OUT=runs/emp_ssl_ablation bash scripts/emp_ssl_ablation.sh [CELL ...]
#
# DATA holds the prepared copies: cifar10 (the JPEG copy as shipped, `onepoch prepare npz`) and, for the
# JPEG cells, cifar10-q75, cifar10-q95, cifar10-q55 (the copy encoded once more by
# scripts/reencode_jpeg_npz.py at that quality, then prepared the same way).
set -euo pipefail
set -f  # the overrides hold [ ]: no filename expansion
DATA=${DATA:-data}
ONEPOCH=${ONEPOCH:-onepoch}
OUT=${OUT:-runs/emp_ssl_ablation}
SEEDS=${SEEDS:-"0 1"}
THREADS=${THREADS:-1}

declare -A CELLS=(
  [base]=""                                  # today's recipe: cosine annealed within the epoch, fp32
  [sched2]="optim.schedule_epochs=2"         # the 84.2 % command's schedule: cosine over 2 epochs, first epoch
  [sched30]="optim.schedule_epochs=30"       # the 80.6 % row's schedule: cosine over 30 epochs, first epoch
  [bf16]="train.amp=bf16"                    # bf16 autocast around the network, as on a GPU
  [jpeg75]="data.root=$DATA/cifar10-q75"     # the copy JPEG-encoded once more at quality 75
  [jpeg95]="data.root=$DATA/cifar10-q95"     # ... at quality 95
  [jpeg55]="data.root=$DATA/cifar10-q55"     # ... at quality 55: a second loss as large as the first (5.8/255)
  [norm05]="views.mean=[0.5,0.5,0.5] views.std=[0.5,0.5,0.5]"  # the official code's input normalisation
  [dp4]="method.bn_chunks=4"                 # BatchNorm as the official nn.DataParallel computes it on 4 GPUs
  [dp8]="method.bn_chunks=8"                 # ... on 8 GPUs
  [base_w05]="model.width=0.5"               # base and sched2 at twice the width: does the schedule matter more
  [sched2_w05]="model.width=0.5 optim.schedule_epochs=2"  # in a larger network?
)
ORDER=(base sched2 sched30 bf16 jpeg55 jpeg75 jpeg95 norm05 dp4 dp8 base_w05 sched2_w05)
if [ $# -gt 0 ]; then ORDER=("$@"); fi

for seed in $SEEDS; do
  for cell in "${ORDER[@]}"; do
    if [ -z "${CELLS[$cell]+x}" ]; then echo "ablation: unknown cell $cell" >&2; exit 2; fi
    name="${cell}_seed${seed}"
    run="$OUT/$name"
    if [ -f "$run/eval.json" ]; then echo "ablation: $name done"; continue; fi
    resume=""
    if [ -f "$run/config.yaml" ]; then resume="--resume"; fi
    # shellcheck disable=SC2086
    cmd="$ONEPOCH train emp_ssl/cifar10_cpu data.root=$DATA/cifar10 ${CELLS[$cell]} seed=$seed name=$name \
train.out=$OUT train.threads=$THREADS eval.amp=off $resume --eval"
    echo "ablation: $cmd"
    $cmd
  done
done
