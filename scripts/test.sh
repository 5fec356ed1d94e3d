#!/usr/bin/env bash
# The whole test suite: set-up, lint, import contracts, type check, then pytest (unit and
# integration tests; the integration tests start their own Mosquitto on free ports).
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh --fast     the same checks, but only the tests that need no broker
#                              (pytest -m "not broker"): the lane to run while editing
# Any other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--fast" ]]; then fast=1; else args+=("$arg"); fi
done
bash scripts/setup.sh --dev
. .venv/bin/activate
echo "== ruff" && ruff check . && ruff format --check .
echo "== imports" && lint-imports --no-cache
echo "== mypy" && mypy
if ((fast)); then
  # One worker per core: these tests share nothing (no broker, no ports, own tmp dirs).
  echo "== pytest (no broker)" && pytest -q -p no:cacheprovider -m "not broker" -n auto \
    ${args[@]+"${args[@]}"}
else
  echo "== pytest" && pytest -q -p no:cacheprovider ${args[@]+"${args[@]}"}
fi
