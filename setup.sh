#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   - the Debian package with Fashion-MNIST (the embedded default dataset),
#   - a virtual environment in .venv with the pinned requirements and this package.
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
if [ ! -f .venv/.requirements-installed ] || ! cmp -s requirements.txt .venv/.requirements-installed; then
  echo "[setup] installing Python requirements (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements-installed
fi
.venv/bin/python -m pip install -q --no-deps -e . >/dev/null 2>&1 || .venv/bin/python -m pip install -q --no-deps -e .
echo "[setup] ready: .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
