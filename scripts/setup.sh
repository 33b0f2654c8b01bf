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
# The web page's browser test drives Debian's chromium through chromedriver (a browser download is not an
# option); installed only where apt-get works and they are missing.
if command -v apt-get >/dev/null 2>&1 && ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
            || echo "setup: could not install chromium/chromium-driver; the browser test will be skipped" >&2
    else
        echo "setup: run 'apt-get install chromium chromium-driver' as root for the browser test (skipped without)" >&2
    fi
fi
# Optional Debian packages that add dictionary, documentation and Chinese text to the corpus; chatforge works
# without them (the data stage lists what is missing), so a failure here is only a note.
DEBIAN_CORPUS="fortunes fortunes-zh manpages-zh wordnet-base dict-gcide python3.11-doc"
if [ ! -f .venv/.debian-corpus-tried ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $DEBIAN_CORPUS >/dev/null 2>&1; then
        echo "installed optional Debian corpus packages: $DEBIAN_CORPUS"
    else
        echo "note: optional Debian corpus packages not installed ($DEBIAN_CORPUS); the corpus is built without them"
    fi
    touch .venv/.debian-corpus-tried
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
