#!/usr/bin/env bash
# Install (CPU torch pinned first so no CUDA build is pulled) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
python -m ruff check .
# Whole files go to each worker (module-scoped servers stay in one process); pytest-benchmark,
# if a developer has it, refuses to run under xdist, and nothing here uses it.
python -m pytest -q -n "${HEADROOM_TEST_WORKERS:-2}" --dist loadfile -p no:benchmark "$@"
