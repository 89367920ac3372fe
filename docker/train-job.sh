#!/bin/sh
# One-off training job of the compose profiles `train` / `train-gpu`: fine-tune with torchrun (DDP),
# then export the best checkpoint into the model store that the api and torchserve services read.
#   GNWS_TRAIN_MODEL  zoo key: architecture and initial weights (fetched unless GNWS_OFFLINE=1)
#   GNWS_TRAIN_NAME   run folder /runs/NAME and model-store name NAME (re-running resumes the run)
#   GNWS_TRAIN_NPROC  processes, one per GPU (1 on CPU)
#   GNWS_TRAIN_DATA   COCO-format root: annotations/instances_{train,val}2017.json + images
# Arguments are passed on to `python -m training train` (e.g. --epochs 12 --images-per-gpu 4).
set -eu
model="${GNWS_TRAIN_MODEL:?set GNWS_TRAIN_MODEL to a zoo key (gnws zoo)}"
name="${GNWS_TRAIN_NAME:?set GNWS_TRAIN_NAME to the name of the fine-tuned model}"
run_dir="/runs/$name"
if [ "${GNWS_OFFLINE:-0}" != "1" ]; then
    gnws fetch "$model"
fi
if [ -d "$run_dir" ]; then
    run="--resume $run_dir"
else
    run="--work-dir $run_dir"
fi
# shellcheck disable=SC2086  # $run is two words on purpose
torchrun --standalone --nproc-per-node "${GNWS_TRAIN_NPROC:-1}" -m training train \
    --model "$model" --data "${GNWS_TRAIN_DATA:-/datasets}" $run "$@"
gnws export "$run_dir" --name "$name"
echo "train-job: exported $name into ${GNWS_MODEL_STORE:-the model store}; serve it with GNWS_EXTRA_MODELS=$name" \
     "or POST /v1/models/<name>/reload"
