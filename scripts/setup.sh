#!/usr/bin/env bash
# Sets up everything emo-mqtt needs, idempotently: system packages (Mosquitto, Fashion-MNIST)
# when we can install them, and a virtual environment in .venv with the package installed.
#   scripts/setup.sh          runtime set-up (the main job)
#   scripts/setup.sh --dev    plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

say() { printf 'setup: %s\n' "$*" >&2; }

# -- system packages -------------------------------------------------------------------
need=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
[[ -d /usr/share/datasets/fashion-mnist || -n "${EMO_DATA_DIR:-}" ]] || need+=(dataset-fashion-mnist)
# The dashboard's browser test drives headless Chromium.
((dev)) && ! [[ -x /usr/bin/chromium ]] && need+=(chromium)
if ((${#need[@]})); then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo="none"; fi
  fi
  if [[ "$sudo" == "none" ]] || ! command -v apt-get >/dev/null 2>&1; then
    say "cannot install ${need[*]} here (no apt-get or no root/sudo); install them yourself."
    ((dev)) && { say "the tests need them: failing."; exit 1; }
  else
    say "installing ${need[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# -- virtual environment ---------------------------------------------------------------
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { say "Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))"; exit 1; }
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.emo-setup-$dev-$(cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1)
if [[ ! -e "$stamp" ]]; then
  # torch first and pinned: a looser spec can pull a multi-GB CUDA build.
  say "installing ${EMO_TORCH_SPEC:-torch==2.13.0} and emo-mqtt into .venv"
  "${pip[@]}" "${EMO_TORCH_SPEC:-torch==2.13.0}"
  if ((dev)); then "${pip[@]}" -e '.[dev]'; else "${pip[@]}" -e .; fi
  rm -f .venv/.emo-setup-*
  touch "$stamp"
fi
