#!/usr/bin/env bash
# The GPU check, from a fresh clone on a machine with one NVIDIA GPU and a package index, in under 8
# minutes: installs the CUDA build of torch (with the triton it was built with) and the project, then
# benchmarks/gpu_check.py runs the gpu and triton tests on the device, the engine benchmark against
# transformers (and with CUDA graphs), the adapter-layer benchmark (32 distinct adapters vs base) and
# the serving benchmark on bench-1b with 100 adapters. Results: $OUT/gpu_check.json and gpu_check.md.
#
#   benchmarks/gpu_check.sh                                   # the check
#   SKIP_INSTALL=1 PYTHON=.venv/bin/python benchmarks/gpu_check.sh --device cpu --tiny   # a CPU dry run
#
# Environment: PYTHON (python3), VENV (.venv-gpu), TORCH_SPEC (torch==2.13.0: the package index's Linux
# wheels are CUDA builds; add an --index-url for another CUDA version), SKIP_INSTALL=1 (use $PYTHON as it
# is), OUT (gpu_check_out), BUDGET_S (470: the whole check, the install included).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OUT=${OUT:-gpu_check_out}
BUDGET_S=${BUDGET_S:-470}

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    PY=$PYTHON
else
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    PY=$VENV/bin/python
    "$PY" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "$PY" -m pip install -q $TORCH_SPEC
    # The dev extra's test tools, without its triton pin (CPU only: CUDA torch brings its own triton).
    mapfile -t dev < <(sed -n '/^dev = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*"' | tr -d '"' | grep -v '^triton')
    "$PY" -m pip install -q -e ".[bench]" "${dev[@]}"
fi
"$PY" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
PY
spent=$(( $(date +%s) - start ))
echo "install: ${spent} s"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s $(( BUDGET_S - spent )) "$@"
