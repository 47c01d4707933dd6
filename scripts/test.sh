#!/usr/bin/env bash
# Install (CPU torch pinned first so no CUDA build is pulled) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
python -m ruff check .
python -m pytest -q "$@"
