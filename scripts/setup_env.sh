# Sourced by the other scripts: creates .venv on first use and activates it; installs the
# requirements again whenever requirements.txt changed since the last install.
# torch is pinned to 2.13.0; which build pip picks depends on the package index (README):
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu asks for the CPU build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv: torch ${TORCH_VERSION:-2.13.0} and requirements.txt (a few minutes, once)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$wanted" > .venv/.requirements.sha256
fi
source .venv/bin/activate
