# Sourced by the other scripts: creates .venv on first use and activates it; installs the
# requirements again whenever requirements.txt changed since the last install.
# torch is pinned to 2.13.0; which build pip picks depends on the machine's index (README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$wanted" > .venv/.requirements.sha256
fi
source .venv/bin/activate
