#!/usr/bin/env bash
# Set up, run the CPU speedrun on the embedded default (every stage, report card), then open a chat with it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/chatforge speedrun "$@"
