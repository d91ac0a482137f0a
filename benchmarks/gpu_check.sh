#!/usr/bin/env bash
# One call on a lent GPU machine (see README "GPU validation"): install, run the GPU
# tests, compute-sanitizer over every CUDA/Triton kernel, and every benchmark.
# Writes gpu_check.log, the sanitizer logs and vapo-bench's report folder under $OUT.
# Usage on the device: bash benchmarks/gpu_check.sh [vapo-bench options, e.g. --suite gae]
# (with .whl carried if peers travel)
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ==="; }

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# An editable install needs a setuptools that builds wheels (>= 70.1, or the `wheel`
# package); where it cannot, the checkout itself is put on the path: nothing below needs
# the console scripts.
if ! python3 -m pip install -q --no-build-isolation --no-deps -e .; then
  echo "pip install -e . failed (see above): using the checkout through PYTHONPATH"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m vapo_kernels.build || exit 1

step "GPU tests"
# Test modules of the CPU-only parts (the diagnostics need scipy, which the GPU machines
# lack) must not stop the GPU tests from being collected.
python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors --maxfail 20 tests/
python3 -m pytest -q -p no:cacheprovider --maxfail 20 tests/test_gae.py

step "compute-sanitizer"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 python3 benchmarks/sanitize_driver.py \
    > "$OUT/sanitizer_$tool.log" 2>&1; echo "$tool exit $?"; tail -3 "$OUT/sanitizer_$tool.log"
done

step "benchmarks"
# every suite, checked then timed; results.json, report.md and PNGs in $OUT/bench (the
# tables are rewritten after each shape, so a run cut short still leaves them). The
# sanitizer ran above: not again here. Pass suites / shapes as arguments to fit the time.
python3 -m vapo_kernels.bench.cli --device cuda --no-sanitize --out "$OUT/bench" "$@" \
  || echo "FAILED: vapo-bench"
ls -la "$OUT" "$OUT/bench"
