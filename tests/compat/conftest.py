"""The peer fixtures of the compat tests: each real peer module, imported once per test
module. A missing peer skips, or fails under VAPO_REQUIRE_PEERS=1 (see ``_peers.py``)."""

from __future__ import annotations

import importlib
import types

import pytest

from ._openrlhf import openrlhf_without_gpu_stack
from ._peers import import_peer, missing_peer, openrlhf_modules, require_version

# --- verl


@pytest.fixture(scope="module")
def verl_core():
    """``verl.trainer.ppo.core_algos``: GAE, the policy / value losses, agg_loss."""
    require_version("verl")
    return import_peer("verl.trainer.ppo.core_algos")


@pytest.fixture(scope="module")
def verl_F():
    """``verl.utils.torch_functional``: log-probs and entropy from logits."""
    require_version("verl")
    return import_peer("verl.utils.torch_functional")


# --- OpenRLHF (imported without its GPU stack, see _openrlhf.py)

_OPENRLHF_EXPERIENCE_PACKAGES = [
    "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils",
    "openrlhf.trainer.ray", "openrlhf.utils",
]


@pytest.fixture(scope="module")
def openrlhf_em():
    """The real ``experience_maker`` module of OpenRLHF (its GAE)."""
    require_version("openrlhf")
    import_peer("openrlhf")
    import_peer("ray")
    launcher = types.ModuleType("openrlhf.trainer.ray.launcher")
    launcher.RayActorGroup = object  # only an annotation in experience_maker
    with openrlhf_without_gpu_stack(_OPENRLHF_EXPERIENCE_PACKAGES, {launcher.__name__: launcher}):
        try:
            return importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
        except ImportError as e:
            missing_peer(f"cannot import OpenRLHF's experience_maker: {e}")


@pytest.fixture(scope="module")
def openrlhf_utils():
    """``openrlhf.models.utils``: log-probs and entropy from logits."""
    with openrlhf_modules("openrlhf.models.utils") as (utils,):
        return utils


@pytest.fixture(scope="module")
def openrlhf_loss():
    """``openrlhf.models.loss``: PolicyLoss, ValueLoss, aggregate_loss."""
    with openrlhf_modules("openrlhf.models.loss") as (loss,):
        return loss


# --- TorchRL


@pytest.fixture(scope="module")
def torchrl_gae():
    require_version("torchrl")
    return import_peer("torchrl.objectives.value.functional").generalized_advantage_estimate


# --- TRL


@pytest.fixture(scope="module")
def trl_utils():
    """``trl.trainer.utils``: selective_log_softmax, entropy_from_logits."""
    require_version("trl")
    return import_peer("trl.trainer.utils")
