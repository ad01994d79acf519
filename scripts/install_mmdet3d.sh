#!/usr/bin/env bash
# Builds the optional mmdet3d venv that the equivalence tests (pytest -m mmdet3d tests/teacher) run in.
#
# Usage: scripts/install_mmdet3d.sh [VENV_DIR]      (default: .venv-mmdet3d beside this repository's pyproject.toml)
#        PYTHON=python3.11 scripts/install_mmdet3d.sh
#
# Idempotent: when VENV_DIR already imports mmdet3d and mmcv's compiled ops, nothing is installed.
# Why each pin:
# - torch==2.13.0 first: its CPU wheel is on this machine's disk; an open torch range makes pip fetch a CUDA build.
# - setuptools<80: mmcv 2.1.0's setup.py imports pkg_resources, which setuptools 80 dropped.
# - mmcv 2.1.0 builds from source (no wheel for torch 2.13) with its CPU ops (MMCV_WITH_OPS=1), about 11 min on
#   2 cores; --no-build-isolation so it compiles against the torch installed here. pip keeps the built wheel in
#   its cache, so a rebuild on the same machine takes a few minutes. mmcv-lite is not enough: every mmdet3d
#   model import needs mmcv._ext.
# - numpy<2: mmcv/mmdet3d 1.4 and nuscenes-devkit are built against numpy 1.
# - our package goes in with --no-deps, so pip cannot replace the pinned torch or reach for zarr/nuscenes-devkit,
#   which the mmdet3d tests do not need.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv-mmdet3d}"
PYTHON="${PYTHON:-python3}"
MAX_JOBS="${MAX_JOBS:-2}"
VENV_PY="$VENV_DIR/bin/python"

# Ready = the stack imports and `distillbev` resolves to THIS checkout (a venv copied from another clone would
# test that clone's code).
ready() {
    [ -x "$VENV_PY" ] && "$VENV_PY" - "$REPO_ROOT" >/dev/null 2>&1 <<'PYTHON'
import os, sys
import mmdet3d, mmcv._ext, pytest, distillbev
sys.exit(os.path.realpath(os.path.dirname(distillbev.__file__)) != os.path.realpath(sys.argv[1]))
PYTHON
}

if ready; then
    echo "mmdet3d venv ready at $VENV_DIR ($("$VENV_PY" -c 'import mmdet3d; print("mmdet3d", mmdet3d.__version__)'))"
    exit 0
fi

start_seconds=$(date +%s)
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_PY" -m pip install --disable-pip-version-check)

"${PIP[@]}" torch==2.13.0 "setuptools<80" wheel ninja mmengine==0.10.7 "numpy<2"
MMCV_WITH_OPS=1 MAX_JOBS="$MAX_JOBS" "${PIP[@]}" --no-build-isolation mmcv==2.1.0 "numpy<2"
"${PIP[@]}" mmdet==3.2.0 mmdet3d==1.4.0 "numpy<2"
# What the teacher code and its tests import besides torch.
"${PIP[@]}" "numpy<2" pyyaml click tqdm "pytest>=8" "pytest-timeout>=2.3"
"${PIP[@]}" --no-deps -e "$REPO_ROOT"

"$VENV_PY" -c "import torch, mmdet3d, mmcv._ext; print('torch', torch.__version__, 'mmdet3d', mmdet3d.__version__)"
if ! ready; then
    echo "error: $VENV_DIR was built but does not import mmdet3d, mmcv._ext, pytest and this checkout's" \
        "distillbev; read the pip output above, delete $VENV_DIR and run this script again" >&2
    exit 1
fi
echo "mmdet3d venv built at $VENV_DIR in $(( $(date +%s) - start_seconds )) s"
