#!/usr/bin/env bash
# Fine-tune the pretrained base model on spoken digits and report its word error rate.
#
#   examples/fsdd/run.sh TRAIN_DIR TEST_DIR EXP_DIR [++key=value ...]
#
# TRAIN_DIR and TEST_DIR hold recordings named like the Free Spoken Digit Dataset's,
# {digit}_{speaker}_{index}.wav, at any sample rate. The transcript of each is its digit.
# Prints `WER <x>%` as its last line. Extra arguments after EXP_DIR go to `paratune finetune`
# (e.g. ++train_conf.max_epoch=5).
#
# The start is base/: a small Paraformer pretrained on digits spoken by 100+ synthetic voices
# (scripts/make_base_model.py rebuilds it). FROM_SCRATCH=1 trains model/ (the same frontend and
# tokens, smaller) from random weights for 30 epochs instead: the recipe before there was a base.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 TRAIN_DIR TEST_DIR EXP_DIR [++key=value ...]" >&2
    exit 2
fi
train_dir=$1 test_dir=$2 exp=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
paratune=${PARATUNE:-paratune}
if [ "${FROM_SCRATCH:-0}" = 1 ]; then
    model=$here/model
    start=(--from-scratch)
else
    model=$here/base
    # fine-tuning: fewer epochs at a lower peak learning rate than the pretraining's; SpecAugment
    # only (the base has heard rates, pitches and levels): settings FunASR's trainer can run alike
    start=(++train_conf.max_epoch=10 ++optim_conf.lr=0.001 ++scheduler_conf.warmup_steps=100
           ++train_conf.keep_nbest_models=5 ++train_conf.avg_nbest_model=5 ++dataset_conf.max_batch=32
           ++dataset_conf.speed_perturb=[1.0] ++dataset_conf.gain_db=0.0)
fi
mkdir -p "$exp/data"

# transcripts from the file names: 3_george_12.wav -> 3
for split in train test; do
    dir=$train_dir
    [ "$split" = test ] && dir=$test_dir
    find "$dir" -maxdepth 1 -name '*_*_*.wav' -printf '%f\n' | sort | awk -F_ '{print $0 "\t" $1}' > "$exp/data/$split.tsv"
    # exit status 1 means some files were left out: the report says which and why
    $paratune prepare "$dir" --transcripts "$exp/data/$split.tsv" --model "$model" \
        --output "$exp/data/$split" >&2 || [ $? -eq 1 ]
done

# every 10th training recording is held out to pick the best epochs: the test folder is only for the WER
awk 'NR % 10 != 0' "$exp/data/train/data.jsonl" > "$exp/data/train/fit.jsonl"
awk 'NR % 10 == 0' "$exp/data/train/data.jsonl" > "$exp/data/train/heldout.jsonl"

$paratune finetune --model "$model" "${start[@]}" --train "$exp/data/train/fit.jsonl" \
    --valid "$exp/data/train/heldout.jsonl" --output "$exp" --budget 1GiB "$@" >&2

$paratune eval --model "$exp/final" --data "$exp/data/test/data.jsonl" | tail -n 1
