#!/usr/bin/env bash
# Check the GPU-only paths (mixed precision, 2 GPUs, memory-efficient attention) on a GPU machine:
#   bash tools/gpu_check.sh [--only fp16] [--work_dir DIR]
# Uses the Python environment you run it in (a GPU build of Paddle); never run in CI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python -u "$here/tools/gpu_check.py" "$@"
