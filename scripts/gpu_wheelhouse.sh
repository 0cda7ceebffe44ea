#!/usr/bin/env bash
# Fill a wheelhouse (default .gpu-wheelhouse, about 3 MB) with what scripts/gpu_check.sh installs, on a machine that
# reaches the package index, for a GPU machine that does not: the sdists of mamba-ssm and causal-conv1d (built
# there: Triton modules only / this GPU's architecture only), the wheels of einops and pytest, and what building
# them needs (setuptools, wheel, packaging, ninja) in case the GPU machine's Python lacks it.
# Needs torch in the running Python (the sdists' setup.py imports it to compute their metadata).
# usage: scripts/gpu_wheelhouse.sh [DIR] [--python-version 3.12]
set -euo pipefail
dir=.gpu-wheelhouse
pyver=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=${2:?--python-version needs a version such as 3.12}; shift 2 ;;
    -*) echo "gpu_wheelhouse.sh: unknown option '$1' (accepted: --python-version)" >&2; exit 2 ;;
    *) dir=$1; shift ;;
  esac
done
mkdir -p "$dir"
py=${PYTHON:-python3}
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$py" -m pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm causal-conv1d -d "$dir"
"$py" -m pip download --only-binary :all: --python-version "$pyver" --platform manylinux2014_x86_64 \
  einops pytest setuptools wheel packaging ninja -d "$dir"
ls -l "$dir"
