"""Importing the real peer packages for the comparison tests.

A peer that is missing, cannot be imported or is not the version an adapter targets
skips its tests on a developer's machine. CI installs every peer and sets
``VAPO_REQUIRE_PEERS=1``: there the same condition fails the test, so a comparison can
never stop running unnoticed (a skipped peer test used to look like a pass).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from types import ModuleType

import pytest

from ._openrlhf import openrlhf_without_gpu_stack

# The versions the adapters in vapo_kernels/compat are written against.
VERSIONS = {"verl": "0.9.1", "openrlhf": "0.11.2", "torchrl": "0.14.1", "trl": "1.12.0"}


def peers_required() -> bool:
    return os.environ.get("VAPO_REQUIRE_PEERS") == "1"


def missing_peer(reason: str):
    """Skip the test, or fail it when VAPO_REQUIRE_PEERS=1."""
    if peers_required():
        pytest.fail(f"{reason} (VAPO_REQUIRE_PEERS=1: every peer must be installed)", pytrace=False)
    pytest.skip(reason)


def require_version(dist: str) -> None:
    """The installed ``dist`` must be the version its adapter targets."""
    version = VERSIONS[dist]
    try:
        found = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        missing_peer(f"{dist} is not installed")
    if found != version:
        missing_peer(f"the adapter targets {dist}=={version}, found {found}")


def import_peer(module: str) -> ModuleType:
    """``importlib.import_module(module)``; a module that does not import is a missing
    peer (as ``pytest.importorskip``, but loud under VAPO_REQUIRE_PEERS=1). Peers warn
    about their own deprecations at import: not ours to see."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as e:
        missing_peer(f"cannot import {module}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def openrlhf_modules(*modules: str):
    """The named ``openrlhf.models`` submodules, really imported, with the package
    ``__init__``s bypassed and GPU-only imports stubbed; they leave ``sys.modules`` on
    exit (flash-attn must not stay stubbed: OpenRLHF imports it at call time and falls
    back when it is missing)."""
    require_version("openrlhf")
    import_peer("openrlhf")
    with openrlhf_without_gpu_stack(["openrlhf", "openrlhf.models"]):
        try:
            found = tuple(importlib.import_module(m) for m in modules)
        except ImportError as e:
            missing_peer(f"cannot import OpenRLHF's {', '.join(modules)}: {e}")
        yield found


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block the adapters use backend ``name`` (None: the automatic choice);
    the peers' signatures have no backend slot, so ``compat.set_backend`` carries it."""
    from vapo_kernels import compat

    compat.set_backend(name)
    try:
        with warnings.catch_warnings():
            # the default backend may fall back to the reference with a one-time warning
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        compat.set_backend(None)


def trl_ppo_trainer_source() -> tuple[Path, str]:
    """(path, text) of TRL's installed ``ppo_trainer.py``: the tests run its own lines."""
    require_version("trl")
    trl = import_peer("trl")
    path = Path(trl.__file__).parent / "experimental" / "ppo" / "ppo_trainer.py"
    if not path.exists():
        missing_peer(f"{path} not found")
    return path, path.read_text()
