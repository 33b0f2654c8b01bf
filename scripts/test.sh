#!/usr/bin/env bash
# Set up (.venv, pinned dependencies) and run the whole test suite, slow end-to-end tests included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest "$@"
