#!/usr/bin/env bash
# Before a lent GPU's 15 minutes: check on this CPU machine that the committed code builds
# and runs with the GPU machines' software (torch 2.11 + CUDA 13.0, triton 3.6,
# transformers 5.17 and nothing else of ours: ../shared/design/gpu.md), CUDA glue included,
# so that benchmarks/gpu_check.sh does not spend the device time on a compile error.
#
#   bash benchmarks/gpu_preflight.sh            # venv + build + GPU-test collection (~5 min)
#   bash benchmarks/gpu_preflight.sh --tests    # ... and the CPU test suite (~15 min more)
#
# Downloads torch 2.11's CUDA wheels once (~4.5 GB, into $VENV, default /tmp/vapo-gpu-venv);
# needs nvcc (CUDA 13) on the PATH. Works on a clean clone of HEAD, not the working tree.
set -euo pipefail
VENV=${VENV:-/tmp/vapo-gpu-venv}
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/vapo-preflight.XXXX)
step() { echo; echo "=== $* ==="; }

step "venv like the GPU machines ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # setuptools as a fresh venv has it (65.x, no bdist_wheel): gpu_check.sh must cope.
  # numpy < 2.3: triton 3.6's interpreter (the CPU tests' Triton) calls int() on 1-element
  # arrays, which numpy 2.3 refuses; the GPU runs compiled Triton, no interpreter.
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
    "numpy<2.3" pybind11 ninja cmake pytest hypothesis
fi
"$VENV/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step "clone of HEAD in $work"
git clone -q "$repo" "$work/repo"
cd "$work/repo"
export PYTHONPATH="$PWD" TORCH_EXTENSIONS_DIR="$work/ext" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit with the headers (nvcc may be a wrapper)
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -f "$d/include/cuda_runtime.h" ]; then CUDA_HOME=$d; break; fi
  done
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME"

step "install as gpu_check.sh does"
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
  || echo "(pip install -e . fails here too: gpu_check.sh falls back to PYTHONPATH)"

step "build with the CUDA kernels"
"$VENV/bin/python" -m vapo_kernels.build
"$VENV/bin/python" -c "from vapo_kernels import _backends; e = _backends.extension(); \
assert e is not None and e.has_cuda, 'no CUDA kernels in the build'; print('has_cuda', e.has_cuda)"

step "collect the GPU tests"
# gpu_check.sh collects past tests/diagnose (scipy is not there); every other module must load.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu --ignore tests/diagnose --co tests/ \
  | tail -1
"$VENV/bin/python" -c "import ast, sys; ast.parse(open('benchmarks/sanitize_driver.py').read())"
"$VENV/bin/python" -m vapo_kernels.bench.cli --help > /dev/null && echo "vapo-bench imports"

if [ "${1:-}" = "--tests" ]; then
  step "the CPU test suite with the GPU machines' versions"
  # tests/diagnose needs scipy, which the GPU machines do not have (nor need).
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" --ignore tests/diagnose \
    tests/
fi
echo; echo "preflight passed ($work)"
