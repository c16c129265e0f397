# Sourced by run_demo.sh, run_tests.sh, run_single.sh and run_multi.sh: create (or reuse) ./.venv and
# install requirements.txt into it, again only when requirements.txt has changed.
# DREAMBOOTH_VENV=<folder> uses another folder; DREAMBOOTH_VENV=none uses the python already on PATH as it
# is and installs nothing (an environment of your own, e.g. with Paddle's GPU build).
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "${DREAMBOOTH_VENV:-}" = none ]; then
  # find_spec instead of an import: a missing paddle is one line here, not a traceback later, in no time
  if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('paddle') is None)" 2>/dev/null; then
    echo "DREAMBOOTH_VENV=none: the python on PATH ($(command -v python || echo none)) has no paddle; activate" \
         "your environment first, or unset DREAMBOOTH_VENV to use .venv" >&2
    exit 1
  fi
else
  _venv="${DREAMBOOTH_VENV:-$_root/.venv}"
  if [ ! -x "$_venv/bin/python" ]; then
    echo "Creating a virtual environment in $_venv"
    python3 -m venv "$_venv"
  fi
  # shellcheck disable=SC1091
  . "$_venv/bin/activate"
  if ! cmp -s "$_root/requirements.txt" "$_venv/.requirements.installed"; then
    echo "Installing requirements.txt into $_venv (first run: a few minutes)"
    python -m pip install -q --upgrade pip
    python -m pip install -q -r "$_root/requirements.txt"
    cp "$_root/requirements.txt" "$_venv/.requirements.installed"
  fi
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
