#!/usr/bin/env bash
# Multi-GPU DreamBooth training on GPUs 0-3 (the seed's command). Override GPUS, MODEL_NAME,
# INSTANCE_DIR and OUTPUT_DIR from the environment; extra arguments go to train_dreambooth.py.
# LAUNCH_ARGS replaces the launcher's device selection (e.g. LAUNCH_ARGS="--nproc_per_node 2" on CPU).
set -euo pipefail
cd "$(dirname "$0")"
export MODEL_NAME="${MODEL_NAME:-CompVis/stable-diffusion-v1-4}"
export INSTANCE_DIR="${INSTANCE_DIR:-./dream_image}"
export OUTPUT_DIR="${OUTPUT_DIR:-./dream_outputs}"
LAUNCH_ARGS="${LAUNCH_ARGS:---gpus ${GPUS:-0,1,2,3}}"

# shellcheck disable=SC2086
python -u -m paddle.distributed.launch $LAUNCH_ARGS train_dreambooth.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --instance_data_dir="$INSTANCE_DIR" \
  --output_dir="$OUTPUT_DIR" \
  --instance_prompt="a photo of sks dog" \
  --height=512 \
  --width=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --learning_rate=5e-6 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=400 \
  "$@"
