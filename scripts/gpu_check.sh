#!/usr/bin/env bash
# One GPU check on a bare CUDA machine, in under 10 minutes, ending in one report (DIR/report.md + DIR/report.json):
#   1. the machine's facts (Python, torch, CUDA, Triton, nvcc, the GPU, which kernel packages import);
#   2. mamba-ssm without its CUDA extension (its SSD kernels are Triton), from the wheelhouse or the package index;
#   3. causal-conv1d built for this GPU's architecture only (its setup.py builds nine by default);
#   4. pytest -m gpu: every fast path against the pure-torch references on CUDA, fp32 and bf16;
#   5. amer bench gpu --quick: tokens/s and MFU of the small and m350 presets, kernels vs references.
# A step that cannot run (no CUDA, no network and no wheelhouse, a failed build, the time budget spent) is recorded
# with the reason and the check goes on with what there is: the kernels are optional, the references always run.
# amer runs from this source tree (PYTHONPATH), so the machine's own torch is used and nothing else is resolved.
#
# usage: scripts/gpu_check.sh [--out DIR] [--wheelhouse DIR] [--budget SECONDS] [--no-install]
#   --out DIR         where the logs and the report go (default: gpu-report)
#   --wheelhouse DIR  sdists and wheels for machines without network (default: .gpu-wheelhouse; scripts/gpu_wheelhouse.sh)
#   --budget SECONDS  wall-clock budget of the whole check (default: 570)
#   --no-install      use the packages as installed
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=gpu-report
wheelhouse=$repo/.gpu-wheelhouse
budget=570
install=1
usage="usage: scripts/gpu_check.sh [--out DIR] [--wheelhouse DIR] [--budget SECONDS] [--no-install]"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory; $usage" >&2; exit 2; }; out=$2; shift 2 ;;
    --wheelhouse) [ $# -ge 2 ] || { echo "gpu_check.sh: --wheelhouse needs a directory; $usage" >&2; exit 2; }
      wheelhouse=$2; shift 2 ;;
    --budget) case "${2:-}" in ''|*[!0-9]*) echo "gpu_check.sh: --budget needs a whole number of seconds, got '${2:-}'; $usage" >&2
        exit 2 ;; esac; budget=$2; shift 2 ;;
    --no-install) install=0; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (accepted: --out, --wheelhouse, --budget, --no-install); $usage" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
rm -f "$out/steps.jsonl" "$out/pytest.xml" "$out/pytest.log" "$out/bench.json" "$out/report.md" "$out/report.json"
py=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_AUTOTUNING=1  # the tests' autotuning results are reused by the benchmark (Triton >= 3.4)
export TRITON_CACHE_DIR="$out/triton-cache"
start=$(date +%s)
failed=0

left() { echo $(( budget - ($(date +%s) - start) )); }
# record NAME ok|failed|skipped SECONDS [MESSAGE]: one line of steps.jsonl (plain Python: no torch import)
record() {
  "$py" -c 'import json, sys; n, s, t, m = sys.argv[1:5]; print(json.dumps({"name": n, "status": s, "seconds": float(t), "message": m.strip()}))' \
    "$1" "$2" "$3" "${4:-}" >> "$out/steps.jsonl"
}
skip() { echo "== $1: skipped: $2"; record "$1" skipped 0 "$2"; }
# run NAME LIMIT_SECONDS COMMAND...: at most LIMIT seconds and never past the budget (30 s kept for the report)
run() {
  local name=$1 limit=$2 t0 rc rest
  shift 2
  rest=$(( $(left) - 30 ))
  if [ "$rest" -lt 20 ]; then skip "$name" "time budget spent"; return 1; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (at most ${limit} s)"
  t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    record "$name" ok $(( $(date +%s) - t0 )) "log: $name.log"
  elif [ $rc -eq 124 ]; then
    record "$name" failed $(( $(date +%s) - t0 )) "stopped after ${limit} s; log: $name.log"
  else
    record "$name" failed $(( $(date +%s) - t0 )) "exit $rc: $(tail -n 3 "$out/$name.log" | tr '\n' ' ' | cut -c1-300)"
  fi
  return $rc
}
have() { "$py" -c "import sys; from amer.ops import kernels; sys.exit(0 if kernels.available()['$1'] else 1)" 2>/dev/null; }
# pip install ARGS...: from the wheelhouse first (no network needed), then the index with a short timeout
pip_install='wh=$1; shift; if [ -d "$wh" ] && "$PY" -m pip install --no-index --find-links "$wh" "$@"; then exit 0; fi
exec "$PY" -m pip install --timeout 15 --retries 0 "$@"'
export PY=$py
export PIP_BREAK_SYSTEM_PACKAGES=1  # a bare machine's system Python may be marked externally managed (PEP 668)

"$py" -m amer.bench.gpu_report env --out "$out" || { echo "gpu_check.sh: $py cannot import torch and amer" >&2; exit 2; }
cuda=$("$py" -c "import torch; print('yes' if torch.cuda.is_available() else 'no')")
if [ "$cuda" != yes ]; then
  why="no CUDA device (torch.cuda.is_available() is False)"
  for s in install-mamba-ssm build-causal-conv1d pytest-gpu bench-gpu; do skip "$s" "$why"; done
else
  if [ $install -eq 0 ]; then
    skip install-mamba-ssm "--no-install"; skip build-causal-conv1d "--no-install"
  else
    # the sdists build with --no-build-isolation, so their build tools must be here (Python 3.12 has no setuptools)
    if ! "$py" -c "import setuptools, wheel, packaging, ninja" 2>/dev/null; then
      run install-build-tools 60 bash -c "$pip_install" _ "$wheelhouse" setuptools wheel packaging ninja || failed=1
    fi
    if have mamba_ssm; then skip install-mamba-ssm "already importable"
    else
      # no CUDA extension (MAMBA_SKIP_CUDA_BUILD), no dependency list (it names GPU packages the SSD kernels do
      # not use); einops is the one it needs. FORCE_BUILD: no lookup of a prebuilt wheel.
      run install-mamba-ssm 150 env MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
        bash -c "$pip_install" _ "$wheelhouse" --no-build-isolation --no-deps mamba-ssm einops || failed=1
    fi
    if have causal_conv1d; then skip build-causal-conv1d "already importable"
    else
      arch=$("$py" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
      build="$out/build-causal-conv1d"
      rm -rf "$build"; mkdir -p "$build"
      sdist=$(ls "$wheelhouse"/causal_conv1d-*.tar.gz 2>/dev/null | head -n 1)
      if [ -z "$sdist" ]; then
        CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$py" -m pip download --timeout 15 --retries 0 --no-deps --no-binary :all: \
          --no-build-isolation causal-conv1d -d "$build" > "$out/download-causal-conv1d.log" 2>&1
        sdist=$(ls "$build"/causal_conv1d-*.tar.gz 2>/dev/null | head -n 1)
      fi
      if [ -z "$sdist" ]; then
        skip build-causal-conv1d "no sdist: none in $wheelhouse and the index is unreachable (conv runs its reference)"
      else
        tar -xzf "$sdist" -C "$build"
        src=$(ls -d "$build"/causal_conv1d-*/ | head -n 1)
        if "$py" -m amer.bench.gpu_report arch-patch "$src/setup.py" "$arch" > "$out/arch-patch.log" 2>&1; then
          run build-causal-conv1d 330 env MAX_JOBS="$(nproc)" NVCC_THREADS=2 CAUSAL_CONV1D_FORCE_BUILD=TRUE \
            "$py" -m pip install --no-build-isolation --no-deps --no-index "$src" || failed=1
        else
          skip build-causal-conv1d "sm_$arch: $(cat "$out/arch-patch.log")"
        fi
      fi
    fi
  fi
  if [ $install -eq 1 ] && ! "$py" -c "import pytest" 2>/dev/null; then
    run install-pytest 60 bash -c "$pip_install" _ "$wheelhouse" pytest || failed=1
  fi
  "$py" -m amer.bench.gpu_report env --out "$out"  # what imports now
  if "$py" -c "import pytest" 2>/dev/null; then
    run pytest-gpu 240 "$py" -m pytest "$repo/tests" -m gpu -q -s -p no:cacheprovider -W ignore::UserWarning \
      --continue-on-collection-errors --junitxml="$out/pytest.xml" || failed=1
    cp "$out/pytest-gpu.log" "$out/pytest.log" 2>/dev/null
  else
    skip pytest-gpu "pytest is not installed and could not be installed"
  fi
  run bench-gpu 240 "$py" -m amer.cli bench gpu --quick --out "$out/bench.json" || failed=1
fi
"$py" -m amer.bench.gpu_report write --out "$out" || exit 2
echo "gpu_check.sh: report in $out/report.md and $out/report.json ($(( $(date +%s) - start )) s)"
exit $failed
