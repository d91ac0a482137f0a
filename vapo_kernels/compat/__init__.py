"""Drop-in replacements for the GAE functions of peer RL libraries.

One module per peer - :mod:`~vapo_kernels.compat.verl`, :mod:`~vapo_kernels.compat.openrlhf`,
:mod:`~vapo_kernels.compat.torchrl`, :mod:`~vapo_kernels.compat.trl`,
:mod:`~vapo_kernels.compat.nemo` - each with the peer's signature, defaults, return types
and numerics, computed by :func:`vapo_kernels.gae` / :func:`vapo_kernels.decoupled_gae`.
Nothing here imports a peer at import time (only ``verl.patch()`` does, when called).

The peers' signatures have no room for a backend argument, so the kernel backend of
every adapter is chosen here with :func:`set_backend` (or the ``VAPO_BACKEND``
environment variable, which applies when no backend is set here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ragged import validation_enabled

_backend: str | None = None


def set_backend(name: str | None) -> None:
    """Kernel backend for every compat adapter (``None``: automatic / ``VAPO_BACKEND``)."""
    global _backend
    _backend = name


def get_backend() -> str | None:
    """The backend set by :func:`set_backend`, or None."""
    return _backend


def _peer_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype a peer's eager arithmetic on these tensors ends in (float ones promote)."""
    dtype = None
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype if dtype is not None else torch.get_default_dtype()


def _scalar(name: str, x) -> float:
    """A Python float from a number or a one-element tensor (peers accept both)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar here; a per-element {name} of shape "
                f"{tuple(x.shape)} is not supported by the fused scan"
            )
        return float(x.item())
    return float(x)


def _check_binary_mask(name: str, mask: Tensor | None) -> None:
    """Peers that multiply by the mask blend fractional weights; the scan treats any
    non-zero entry as valid, so a non-binary float mask would silently disagree."""
    if mask is None or not mask.is_floating_point() or not validation_enabled():
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be binary (0/1); fractional weights are not supported")


__all__ = ["get_backend", "set_backend"]
