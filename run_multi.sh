#!/usr/bin/env bash
# Multi-GPU DreamBooth training (the seed's command, GPUs 0-3): bash run_multi.sh [extra trainer args]
# Takes MODEL_NAME, INSTANCE_DIR, OUTPUT_DIR and arguments like run_single.sh, plus GPUS (default 0,1,2,3)
# and LAUNCH_ARGS, which replaces the launcher's device selection (e.g. "--nnodes 2 --master IP:PORT
# --gpus 0,1,2,3" on each of two machines). Without a GPU it trains with 2 CPU processes. The launcher's
# per-process logs (workerlog.<local rank>) go to OUTPUT_DIR/launch_logs (OUTPUT_DIR/launch_logs/<host>
# with --nnodes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/setup_venv.sh"
MODEL_NAME="${MODEL_NAME:-CompVis/stable-diffusion-v1-4}"
INSTANCE_DIR="${INSTANCE_DIR:-./dream_image}"
OUTPUT_DIR="${OUTPUT_DIR:-./dream_outputs}"
LAUNCH_ARGS="${LAUNCH_ARGS:-}"

# The output folder the trainer will use: like argparse, the last --output_dir of the arguments wins.
out="$OUTPUT_DIR" prev=""
for arg in "$@"; do
  [ "$prev" = --output_dir ] && out="$arg"
  case "$arg" in --output_dir=*) out="${arg#--output_dir=}" ;; esac
  prev="$arg"
done

# Paddle's launcher given --gpus on a machine without one dies deep inside with a traceback, so ask Paddle
# first (a CPU build reports no CUDA at all).
want_gpus=""
if [ -n "${GPUS:-}" ] && [ -z "$LAUNCH_ARGS" ]; then want_gpus="GPUS=$GPUS"; fi
case " $LAUNCH_ARGS " in *" --gpus"*|*" --devices"*) want_gpus="LAUNCH_ARGS=\"$LAUNCH_ARGS\"" ;; esac
if [ -z "$LAUNCH_ARGS" ] || [ -n "$want_gpus" ]; then
  gpus="$(python -c "import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)" \
          2>/dev/null | tail -n 1)" || gpus=0
  if [ "${gpus:-0}" = 0 ]; then
    if [ -n "$want_gpus" ]; then
      echo "run_multi.sh: $want_gpus asks for GPUs, but this Paddle sees none (a CPU build, or no CUDA device);" \
           "unset it to train with 2 CPU processes, or install Paddle's GPU build (see README)" >&2
      exit 1
    fi
    LAUNCH_ARGS="--nproc_per_node 2"
    echo "run_multi.sh: no GPU found, training with 2 CPU processes (LAUNCH_ARGS=\"--nproc_per_node N\" for N)"
  elif [ -z "$LAUNCH_ARGS" ]; then
    LAUNCH_ARGS="--gpus ${GPUS:-0,1,2,3}"
  fi
fi

logs="$out/launch_logs"
case " $LAUNCH_ARGS " in *" --nnodes"*) logs="$logs/$(hostname)" ;; esac  # one folder per machine
case " $LAUNCH_ARGS " in *" --log_dir"*) log_arg=() ;; *) log_arg=(--log_dir "$logs") ;; esac

status=0
# shellcheck disable=SC2086
python -u -m paddle.distributed.launch $LAUNCH_ARGS ${log_arg[@]+"${log_arg[@]}"} "$here/train_dreambooth.py" \
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
  "$@" || status=$?
if [ "$status" != 0 ]; then
  echo "run_multi.sh: training failed (exit $status); each process's output is in $logs/workerlog.<local rank>" >&2
fi
exit "$status"
