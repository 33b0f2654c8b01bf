#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install chatforge with its pinned dependencies.
# Sourced by speedrun.sh and test.sh; safe to run again (pip skips what is already installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
STAMP=.venv/.chatforge-installed
if [ ! -f "$STAMP" ] || [ requirements.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -r requirements.txt
    .venv/bin/python -m pip install --quiet --no-deps -e .
    touch "$STAMP"
fi
