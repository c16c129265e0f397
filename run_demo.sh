#!/usr/bin/env bash
# One-command demo for a fresh clone, no GPU and no model hub needed: bash run_demo.sh [extra trainer args]
# DEMO_DIR (output root), DEMO_STEPS and DEMO_CLASS_IMAGES (so a test can run a shorter demo) are optional;
# DEMO_PRIOR=0 trains without prior preservation, DEMO_MASKED=0 without --masked_loss,
# DEMO_CAPTIONS=0 without the photos' caption files, DEMO_SEED=N with another training seed
# (bench/efficacy.py compares them).
set -euo pipefail

cat <<'EOF_INTRO'
=== DreamBooth demo ===
 1. starts from models/drawn-world, a small Stable Diffusion model shipped with the project and
    trained on a drawn world of toys, buckets, dogs, cups and balls in a room, on the beach, in the
    snow and on the grass (world/build_base.py made it);
 2. teaches it one subject, the toy robot of examples/sks_toy, as "sks toy", with prior preservation
    (class images of "a photo of toy" the base model draws first), training the text encoder too;
    each photo's caption file names its scene and its alpha channel weights the toy over the scene;
 3. samples "a photo of sks toy", "a photo of sks toy on the beach" and "a photo of toy" from the
    base model and from the trained one, side by side, into one grid.
One to two minutes on a 2-core CPU after the one-time install.
The real thing: MODEL_NAME=... INSTANCE_DIR=... OUTPUT_DIR=... bash run_single.sh
EOF_INTRO

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A DEMO_DIR given by the caller is relative to where they called from, so resolve it before the cd.
mkdir -p "${DEMO_DIR:-$here/demo_output}"
DEMO_DIR="$(cd "${DEMO_DIR:-$here/demo_output}" && pwd)"
cd "$here"

. ./setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# demo_output/base-model is the pipeline the demo starts from: a link to the shipped one.
ln -sfn "$here/models/drawn-world" "$DEMO_DIR/base-model"
prior=(--with_prior_preservation --prior_loss_weight=1.0 --class_data_dir="$DEMO_DIR/class_images"
       --num_class_images="${DEMO_CLASS_IMAGES:-20}" --sample_batch_size=10 --class_inference_steps=10
       --class_guidance_scale=4)
[ "${DEMO_PRIOR:-1}" = 0 ] && prior=()
masked=(--masked_loss)
[ "${DEMO_MASKED:-1}" = 0 ] && masked=()
captions=(--use_image_captions --caption_dropout_rate=0.1)
[ "${DEMO_CAPTIONS:-1}" = 0 ] && captions=()

python -u train_dreambooth.py \
  --pretrained_model_name_or_path="$DEMO_DIR/base-model" \
  --instance_data_dir=examples/sks_toy \
  --output_dir="$DEMO_DIR/dreambooth-model" \
  "${prior[@]}" "${masked[@]}" "${captions[@]}" \
  --instance_prompt="a photo of sks toy" \
  --class_prompt="a photo of toy" \
  --resolution=64 --center_crop \
  --train_batch_size=1 --gradient_accumulation_steps=1 \
  --train_text_encoder \
  --learning_rate=2e-4 --lr_scheduler=constant --lr_warmup_steps=0 \
  --max_train_steps="${DEMO_STEPS:-400}" \
  --diagnostics_steps=20 \
  --seed="${DEMO_SEED:-0}" --overwrite_output_dir "$@"

python demo_samples.py "$DEMO_DIR/dreambooth-model" --base "$DEMO_DIR/base-model" \
  --prompt "a photo of sks toy" --prompt "a photo of sks toy on the beach" --prompt "a photo of toy" \
  --num_images 4 --steps 10 --guidance_scale 6 --height 64 --width 64 --seed 0 \
  --out "$DEMO_DIR/samples_grid.png"

cat <<EOF_DONE

=== Done ===
 base model:     $DEMO_DIR/base-model   (links to models/drawn-world)
 trained model:  $DEMO_DIR/dreambooth-model   (load it with StableDiffusionPipeline.from_pretrained)
 class images:   $DEMO_DIR/class_images
 samples grid:   $DEMO_DIR/samples_grid.png   (each row: 4 base-model samples, then the same seeds after DreamBooth)
 training logs:  $DEMO_DIR/dreambooth-model/logs
EOF_DONE
