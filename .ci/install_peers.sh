#!/usr/bin/env bash
# Install the peer RL libraries that tests/compat/test_gae_peers.py (pytest -m peers)
# compares against, on a machine where torch is already installed (torch 2.13.0 here).
#
# It never replaces that torch: every install that pip resolves runs under a constraint
# pinning the installed torch version (pip fails rather than pull another torch), and
# the peers whose own requirements conflict or drag in GPU stacks go in with --no-deps:
#   * verl 0.9.1 pins tensordict<=0.10 and transformers<5.11, while TorchRL 0.14.1
#     needs tensordict 0.14; verl's GAE module works with the versions below.
#   * OpenRLHF 0.11.2 requires deepspeed, flash-attn, vllm, bitsandbytes...; the test
#     imports only experience_maker.py and stubs those for the import.
#   * TRL 1.12.0 is only read: the test takes the PPO advantage block from its source.
# pytest and hypothesis come from the project's test extra (pip install -e .[test]).
#
# Usage: .ci/install_peers.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
# shellcheck source=.ci/retry.sh
. "$(dirname "$0")/retry.sh"

PYTHON="${PYTHON:-python}"
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" >"$constraints"
pip_install=("$PYTHON" -m pip install --disable-pip-version-check)

# 1. Resolved by pip, torch pinned: TorchRL, and what the peer modules the tests import
#    need at module level (verl.trainer.ppo.core_algos pulls transformers, accelerate, ray,
#    omegaconf, codetiming, dill, tensordict; verl.workers.utils.losses also datasets;
#    OpenRLHF's experience_maker: ray; trl.trainer.utils: pandas and accelerate). Without
#    pandas and datasets, 22 peer tests skipped in CI.
echo "installing the peer packages (TorchRL, verl, OpenRLHF, TRL and what they import)"
retry "${pip_install[@]}" -c "$constraints" \
    torchrl==0.14.1 tensordict==0.14.3 \
    transformers==5.24.0 accelerate==1.15.0 \
    ray==2.60.0 omegaconf==2.4.0 codetiming==1.4.0 dill==0.4.1 \
    pandas==3.1.1 datasets==5.2.0

# 2. Without their dependency lists (see above).
retry "${pip_install[@]}" --no-deps verl==0.9.1 openrlhf==0.11.2 trl==1.12.0

# torch must be the one we started with.
"$PYTHON" -c "import torch, sys; v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == '${TORCH_VERSION}' else f'torch changed: {v} != ${TORCH_VERSION}')"
