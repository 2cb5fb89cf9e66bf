#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating and filling it first when needed.
#   bash scripts/env.sh python train.py         # the quick-start training run
#   bash scripts/env.sh pytest                  # the test suite
# The environment lives in .venv (override with VENV=...). It is (re)installed whenever
# requirements.txt or constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.installed"
want="$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing requirements (pinned by constraints.txt); this takes a few minutes once" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$venv/bin/python" -c "import torch, torchvision, diffusers, timm, hydra, torch_fidelity, safetensors" \
    || { echo "[env] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
