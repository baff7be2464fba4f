# Sourced by the other scripts: creates .venv on first use and activates it.
# torch is pinned to the CPU build so a fresh CPU machine never pulls CUDA packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -r requirements.txt
fi
source .venv/bin/activate
