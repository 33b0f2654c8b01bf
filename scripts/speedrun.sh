#!/usr/bin/env bash
# Set up, run the CPU speedrun on the embedded default (every stage, report card), then open a chat with the
# final model when run from a terminal. Arguments go to `chatforge speedrun` (e.g. --pretrain.model.preset=ada).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/chatforge speedrun "$@"
RUN_DIR=runs/speedrun
for arg in "$@"; do
    case "$arg" in --run_dir=*) RUN_DIR="${arg#--run_dir=}" ;; esac
done
if [ -t 0 ] && [ -t 1 ]; then
    for model in "$RUN_DIR/ppo" "$RUN_DIR/sft"; do
        if [ -d "$model/checkpoints" ]; then
            echo "chatting with $model (/quit to leave; /reset, /system TEXT, /save FILE)"
            exec .venv/bin/chatforge chat --ckpt="$model"
        fi
    done
fi
