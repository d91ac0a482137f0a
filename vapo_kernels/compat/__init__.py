"""Drop-in replacements for functions of peer RL libraries.

One module per peer - :mod:`~vapo_kernels.compat.verl`, :mod:`~vapo_kernels.compat.openrlhf`,
:mod:`~vapo_kernels.compat.torchrl`, :mod:`~vapo_kernels.compat.trl`,
:mod:`~vapo_kernels.compat.nemo` - each with the peer's signature, defaults, return types
and numerics:

* GAE (all five), computed by :func:`vapo_kernels.gae` / :func:`vapo_kernels.decoupled_gae`;
* token log-probs and entropy from logits (verl's ``logprobs_from_logits``,
  ``entropy_from_logits[_with_chunking]``, ``linear_cross_entropy``; OpenRLHF's
  ``log_probs_from_logits``, ``compute_entropy``; TRL's ``selective_log_softmax``,
  ``entropy_from_logits``), computed by :func:`vapo_kernels.token_logprobs`. These
  return float32 for half-precision logits, where the peers' CPU / eager paths round to
  bf16 - the one deliberate dtype difference, documented per module;
* PPO losses (verl's ``compute_policy_loss_vanilla``, ``agg_loss``, ``compute_value_loss``,
  ``kl_penalty``; OpenRLHF's ``PolicyLoss``, ``ValueLoss``, ``aggregate_loss``; TRL's
  inline PPO loss as ``ppo_loss``), computed by the fused token-loss op
  (:func:`vapo_kernels.policy_loss`, :func:`vapo_kernels.value_loss`,
  :func:`vapo_kernels.agg_loss`). Where a peer divides 0 by 0 (no valid token) these
  give 0; the other differences are listed per module.

An error names the argument as the peer's signature does: the checks of our functions
report under the adapter's names (a NaN in verl's ``vpreds`` is reported as ``vpreds``,
not as the ``values`` of :func:`vapo_kernels.value_loss` it is passed to).

Nothing here imports a peer at import time. ``patch()`` / ``unpatch()`` of the verl,
OpenRLHF and TRL modules import the peer and swap the adapters into it (and back).

The peers' signatures have no room for a backend argument, so the kernel backend of
every adapter is chosen here with :func:`set_backend` (or the ``VAPO_BACKEND``
environment variable, which applies when no backend is set here).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
from torch import Tensor

from .._backends import BACKENDS
# _peer_names(fn, ...): one of our functions, its errors in the peer's argument names
from .._ragged import named_as as _peer_names, validation_enabled
from .. import token_logprobs

_backend: str | None = None


def set_backend(name: str | None) -> None:
    """Kernel backend for every compat adapter (``None``: automatic / ``VAPO_BACKEND``).

    Checked here: the adapters' signatures have no ``backend`` argument that a later error
    could name.
    """
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS} or None, got {name!r}")
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
    try:
        return float(x)
    except (TypeError, ValueError):  # float()'s own message names no argument
        raise TypeError(
            f"{name} must be a number or a one-element tensor, got {type(x).__name__}"
        ) from None


def _at_most_one(clip_low):
    """A lower clip range capped at 1: 1 - clip_low <= 0 clips nothing (the ratio is
    positive), as 1 - 1 = 0 does. What cannot be compared (None, a list) goes to the op
    as it is, which refuses it by name; ``min``'s TypeError would name nothing."""
    try:
        return min(clip_low, 1.0)
    except TypeError:
        return clip_low


def _entropy(logits: Tensor) -> Tensor:
    """Entropy of every row of ``logits`` (..., V) through the token log-prob op."""
    flat = logits.dim() == 1
    if flat:
        logits = logits.unsqueeze(0)
    # Any in-range target will do: only the entropy output is used (its log-prob output
    # gets no gradient, so it adds nothing to the backward).
    targets = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = token_logprobs(logits, targets, return_entropy=True, backend=get_backend())
    return entropy.squeeze(0) if flat else entropy


def _check_binary_mask(name: str, mask: Tensor | None) -> None:
    """Peers that multiply by the mask blend fractional weights; the scan treats any
    non-zero entry as valid, so a non-binary float mask would silently disagree."""
    if mask is None or not mask.is_floating_point() or not validation_enabled():
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be binary (0/1); fractional weights are not supported")


class _Swap:
    """One peer function replaced by ours wherever the peer's package holds it by name.

    ``from m import f`` copies the reference, so replacing ``m.f`` alone misses modules
    imported earlier: every loaded module of ``package`` whose attribute ``name`` *is*
    the peer's function gets the replacement (modules imported later read it from ``m``).
    :meth:`undo` puts the peer's function back wherever the replacement is found.
    Objects that stored the function elsewhere (an instance attribute, a closure, a
    ``torch.compile`` wrapper built before :meth:`apply`) keep what they stored.
    """

    def __init__(self, package: str, module: str, name: str, replacement: Callable) -> None:
        self.package, self.module, self.name = package, module, name
        self.replacement = replacement
        self.original: Callable | None = None

    def _modules(self) -> Iterator[ModuleType]:
        prefix = self.package + "."
        for key, mod in list(sys.modules.items()):
            if (key == self.package or key.startswith(prefix)) and isinstance(mod, ModuleType):
                yield mod

    def apply(self) -> None:
        try:
            home = importlib.import_module(self.module)
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] == self.package:
                raise
            # The peer is there but one of its own dependencies is not (a peer installed
            # with --no-deps): say which, not a traceback from deep inside the peer.
            raise ImportError(
                f"patch(): importing {self.module} needs {error.name!r}, a dependency of "
                f"{self.package} that is not installed (pip install {error.name.split('.')[0]})"
            ) from error
        if self.name not in vars(home):
            raise AttributeError(
                f"{self.module} has no {self.name}: not the peer version this adapter targets"
            )
        current = vars(home)[self.name]
        if self.original is None:
            if current is self.replacement:  # a stale patch of an earlier session
                raise RuntimeError(f"{self.module}.{self.name} is already replaced")
            self.original = current
        for mod in self._modules():
            if vars(mod).get(self.name) is self.original:
                setattr(mod, self.name, self.replacement)

    def undo(self) -> None:
        if self.original is None:
            return
        for mod in self._modules():
            if vars(mod).get(self.name) is self.replacement:
                setattr(mod, self.name, self.original)
        self.original = None

    @property
    def active(self) -> bool:
        return self.original is not None


__all__ = ["get_backend", "set_backend"]
