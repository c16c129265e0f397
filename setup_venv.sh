# Sourced by run_demo.sh and run_tests.sh: create (or reuse) ./.venv and install
# requirements.txt into it, again only when requirements.txt has changed.
# Set DREAMBOOTH_VENV to use another folder.
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
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
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
