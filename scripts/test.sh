#!/usr/bin/env bash
# The test suite on CPU: sets up .venv on first use (CPU torch), then runs pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest -q tests "$@"
