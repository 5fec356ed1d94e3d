#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, then pytest (unit and integration tests;
# the integration tests start their own Mosquitto on free ports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
echo "== ruff" && ruff check .
echo "== mypy" && mypy
echo "== pytest" && pytest -q -p no:cacheprovider "$@"
