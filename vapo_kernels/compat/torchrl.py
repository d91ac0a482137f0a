r"""TorchRL 0.14.1 drop-in: ``generalized_advantage_estimate``.

Same signature and results as TorchRL's
``torchrl.objectives.value.functional.generalized_advantage_estimate``: explicit
next-state values, ``done`` and ``terminated`` flags, any batch dimensions, time along
``time_dim`` (default -2, i.e. ``[*B, T, F]`` with trailing feature dims), returns
``(advantage, value_target)``.

How it maps onto the fused scan: the TD error
``delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t`` is elementwise, so it is
computed first and fed to the scan as its rewards with zero values. ``done_t`` ends the
chain after step t, so the flags cut every time series into segments that become packed
sequences (``cu_seqlens``); within a segment the scan is ``A_t = delta_t + c * A_{t+1}``
with ``c = gamma * lmbda``.

Numerics follow TorchRL: ``gamma * (1 - terminated)`` and ``gamma * lmbda`` are rounded
to float32 as TorchRL's integer-flag products are, and the advantage is returned in
``next_state_value.dtype``. Differences, outside TorchRL's well-defined inputs:
``done``/``terminated`` must be bool (TorchRL's ``~flag`` on an integer tensor is a
bitwise not); ``gamma``, ``lmbda`` must be scalars in [0, 1]; half-precision inputs are
accumulated in float32; the outputs carry no autograd graph (TorchRL's Python loop is
differentiable - use it if you need gradients through the estimate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ragged
from ..ops.gae import gae
from . import _peer_names, _scalar, get_backend

__all__ = ["generalized_advantage_estimate"]

_SHAPE_ERR = "All input tensors (value, reward and done states) must share a unique shape."

# The scan's rewards are the TD errors: a NaN there comes from one of these inputs.
_gae = _peer_names(gae, rewards="reward + gamma * next_state_value - state_value")


def _time_axis(ndim: int, numel: int, time_dim: int) -> int:
    """The absolute time axis, with TorchRL's rules for which ``time_dim`` are valid.

    TorchRL moves time to -2 only for ``time_dim != -2`` and tensors of more than one
    element, then needs ``[..., T, F]``; a 1-element 1-D input therefore fails there.
    """
    if time_dim == -2 or numel <= 1:
        if ndim < 2:
            raise ValueError(
                f"inputs need at least 2 dims ([*B, T, F]) for time_dim=-2, got {ndim}"
            )
        return ndim - 2
    rel = time_dim - ndim if time_dim >= 0 else time_dim
    bad = rel < -ndim or rel >= 0 or (ndim == 1 and rel != -1)
    if bad:
        raise RuntimeError(
            f"The tensor shape and the time dimension are not compatible: "
            f"got {ndim} dims and time_dim={time_dim}."
        )
    return ndim + rel


def generalized_advantage_estimate(
    gamma: float,
    lmbda: float,
    state_value: Tensor,
    next_state_value: Tensor,
    reward: Tensor,
    done: Tensor,
    terminated: Tensor | None = None,
    *,
    time_dim: int = -2,
) -> tuple[Tensor, Tensor]:
    r"""GAE of trajectories with explicit next values: ``(advantage, value_target)``.

    Along the time axis, per every other index::

        delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t
        A_t     = delta_t + gamma * lmbda * (1 - done_t) * A_{t+1}     (A_T = 0)
        value_target = A + V

    ``terminated`` defaults to ``done``. All tensors share one shape.
    """
    if terminated is None:
        terminated = done
    if not (
        next_state_value.shape == state_value.shape == reward.shape == done.shape
        == terminated.shape
    ):
        raise RuntimeError(_SHAPE_ERR)
    for name, flag in (("done", done), ("terminated", terminated)):
        if flag.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {flag.dtype}")
    gamma = _scalar("gamma", gamma)
    lmbda = _scalar("lmbda", lmbda)
    # checked here: the scan sees only their product
    _ragged.check_unit_interval("gamma", gamma)
    _ragged.check_unit_interval("lmbda", lmbda)
    axis = _time_axis(state_value.ndim, state_value.numel(), time_dim)
    with torch.no_grad():
        # TorchRL multiplies gamma by an int32 flag tensor: the product is float32.
        g_not_term = gamma * (~terminated).to(torch.int32)
        delta = reward + g_not_term * next_state_value - state_value
        adv_dtype = next_state_value.dtype
        if delta.numel() == 0:
            advantage = torch.zeros(delta.shape, dtype=adv_dtype, device=delta.device)
            return advantage, advantage + state_value

        # Time last, every other index a row; each done flag closes a segment after it.
        rows = delta.movedim(axis, -1)
        moved_shape = rows.shape
        length = moved_shape[-1]
        rows = rows.reshape(-1, length)
        cut = done.movedim(axis, -1).reshape(-1, length).clone()
        cut[:, -1] = True  # the end of each row always closes a segment
        ends = torch.nonzero(cut.reshape(-1)).reshape(-1) + 1
        cu_seqlens = torch.cat([ends.new_zeros(1), ends])
        # gamma * lmbda rounded to float32 like TorchRL's ``lmbda * gamma * not_done``;
        # passed as lam with gamma=1 so the scan's coefficient is exactly that number.
        coef = float(torch.tensor(lmbda * gamma, dtype=torch.float32))
        flat = rows.reshape(-1)
        adv, _ = _gae(
            flat,
            torch.zeros_like(flat),
            None,
            cu_seqlens,
            gamma=1.0,
            lam=coef,
            backend=get_backend(),
        )
        advantage = adv.to(adv_dtype).reshape(moved_shape).movedim(-1, axis)
        if state_value.ndim == 1 and time_dim >= 0:
            # TorchRL gives a 1-D input a feature dim when time_dim is spelled >= 0.
            advantage, state_value = advantage.unsqueeze(-1), state_value.unsqueeze(-1)
        return advantage, advantage + state_value
