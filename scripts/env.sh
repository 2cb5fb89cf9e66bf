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
  # torch's x86_64 wheel is a CUDA build: the environment takes about 6 GB. Say so before pip
  # fails half-way with "No space left on device".
  free_kb="$(df -Pk "$venv" | awk 'NR==2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 6500000 ]; then
    echo "[env] warning: $((free_kb / 1024)) MB free where $venv lives; the install needs about 6,500 MB." >&2
    echo "[env] free some space there, or point VENV=... at a disk with room." >&2
  fi
  # No pip cache: it would keep a second copy of the multi-GB wheels.
  "$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check -r requirements.txt -c constraints.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$venv/bin/python" -c "import torch, torchvision, diffusers, timm, hydra, torch_fidelity, safetensors" \
    || { echo "[env] install failed: see the pip output above (disk: $(df -Ph "$venv" | awk 'NR==2 {print $4}') free)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
