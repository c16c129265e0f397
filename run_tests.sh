#!/usr/bin/env bash
# Run the test suite on the CPU: bash run_tests.sh [pytest args]
set -e
cd "$(dirname "$0")"
. ./setup_venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q "$@"
