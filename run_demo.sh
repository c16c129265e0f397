#!/usr/bin/env bash
# One-command demo for a fresh clone, no GPU and no model hub needed: bash run_demo.sh [extra trainer args]
# DEMO_DIR (output root), DEMO_STEPS and DEMO_CLASS_IMAGES (so a test can run a shorter demo) are optional.
set -euo pipefail

cat <<'EOF'
=== DreamBooth demo ===
 1. builds a tiny, randomly initialised Stable Diffusion model locally (no download),
 2. trains DreamBooth with prior preservation on the example toy photos in examples/sks_toy,
 3. samples "a photo of sks toy" and "a photo of toy" into one grid.
The model is tiny and random, so the pictures look like noise: this shows the pipeline works,
not what DreamBooth can do. About a minute on a 2-core CPU after the one-time install.
The real thing: MODEL_NAME=... INSTANCE_DIR=... OUTPUT_DIR=... bash run_single.sh
EOF

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A DEMO_DIR given by the caller is relative to where they called from, so resolve it before the cd.
mkdir -p "${DEMO_DIR:-$here/demo_output}"
DEMO_DIR="$(cd "${DEMO_DIR:-$here/demo_output}" && pwd)"
cd "$here"

. ./setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# model_index.json is written last, so its presence means an earlier build finished.
if [ ! -f "$DEMO_DIR/tiny-sd/model_index.json" ]; then
  python tiny_sd.py "$DEMO_DIR/tiny-sd"
fi

python -u train_dreambooth.py \
  --pretrained_model_name_or_path="$DEMO_DIR/tiny-sd" \
  --instance_data_dir=examples/sks_toy \
  --class_data_dir="$DEMO_DIR/class_images" \
  --output_dir="$DEMO_DIR/dreambooth-model" \
  --with_prior_preservation --prior_loss_weight=1.0 \
  --instance_prompt="a photo of sks toy" \
  --class_prompt="a photo of toy" \
  --height=64 --width=64 \
  --train_batch_size=1 --gradient_accumulation_steps=1 \
  --learning_rate=5e-4 --lr_scheduler=constant --lr_warmup_steps=0 \
  --num_class_images="${DEMO_CLASS_IMAGES:-10}" --sample_batch_size=5 \
  --max_train_steps="${DEMO_STEPS:-100}" \
  --diagnostics_steps=20 \
  --seed=0 --overwrite_output_dir "$@"

python demo_samples.py "$DEMO_DIR/dreambooth-model" \
  --prompt "a photo of sks toy" --prompt "a photo of toy" \
  --num_images 2 --steps 10 --height 64 --width 64 --seed 0 \
  --out "$DEMO_DIR/samples_grid.png"

cat <<EOF

=== Done ===
 trained model:  $DEMO_DIR/dreambooth-model   (load it with StableDiffusionPipeline.from_pretrained)
 class images:   $DEMO_DIR/class_images
 samples grid:   $DEMO_DIR/samples_grid.png   (single images beside it)
 training logs:  $DEMO_DIR/dreambooth-model/logs
EOF
