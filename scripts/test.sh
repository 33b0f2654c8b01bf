#!/usr/bin/env bash
# Set up (.venv, pinned dependencies), lint (ruff: pyflakes, pycodestyle, import order, lines <= 120), check the
# layers contract of pyproject.toml (import-linter), then run the whole test suite, slow end-to-end tests included.
# A lint or contract failure fails the run before any test starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/python -m ruff check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
