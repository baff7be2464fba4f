#!/usr/bin/env bash
# The linter and the formatter check (ruff, pinned in requirements.txt; rules in pyproject.toml).
# `ruff format .` applies the formatting; `ruff check --fix .` fixes what it can.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
ruff check .
ruff format --check .
