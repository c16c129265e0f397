#!/usr/bin/env bash
# Single-GPU DreamBooth training (the seed's command): bash run_single.sh [extra trainer args]
# MODEL_NAME, INSTANCE_DIR and OUTPUT_DIR from the environment replace the defaults below; arguments are
# passed on to train_dreambooth.py, where a repeated flag overrides the script's value. Relative paths are
# relative to the folder you run it from. Runs in ./.venv like run_demo.sh (see setup_venv.sh;
# DREAMBOOTH_VENV=none keeps the python on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/setup_venv.sh"
MODEL_NAME="${MODEL_NAME:-CompVis/stable-diffusion-v1-4}"
INSTANCE_DIR="${INSTANCE_DIR:-./dream_image}"
OUTPUT_DIR="${OUTPUT_DIR:-./dream_outputs}"

python -u "$here/train_dreambooth.py" \
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
