#!/usr/bin/env bash
# One-step set-up on a fresh machine: system packages (when root), a virtual environment, the package.
# torch==2.13.0: the CPU wheel on the project's dev/CI machines (it lies on their disk); on any other machine
# PyPI's default Linux wheel of the same version, which is the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)                      # dashboard end-to-end test
  command -v ss >/dev/null || need+=(iproute2)                      # platform/local health checks
  command -v pgrep >/dev/null || need+=(procps)
  dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
else
  echo "setup: not root: skipping system packages (chromium, dataset-fashion-mnist); tests needing them skip"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
.venv/bin/python -c "import torch, ray, mlflow, optuna, betadiff; print('setup: ok, torch', torch.__version__, '| cuda', torch.cuda.is_available())"
