#!/usr/bin/env bash
# Set up (or refresh) .venv with Esper and its dev tools. Idempotent; a fresh machine needs only Python 3.11+.
# torch comes first and pinned: pip takes 2.14.1 from the local disk where it lies there, and an
# unpinned torch would make pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
