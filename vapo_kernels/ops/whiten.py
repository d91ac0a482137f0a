r"""``vapo::masked_whiten``: ``(x - mean) * rsqrt(var + eps)`` with the mean and variance of
the valid tokens of the whole batch (verl's ``masked_whiten``, OpenRLHF's biased form).

Masked slots never reach the statistics (selects, not ``x * mask``), so garbage there
changes no valid output. The output is float32 (float64 for float64 input) and, like the
advantages it usually whitens, not differentiable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backends, _ragged
from .._library import Op, mark_outputs_constant, no_gradient


def reference_whiten_kernel(
    x: Tensor, mask: Tensor | None, unbiased: bool, eps: float, shift_mean: bool
) -> tuple[Tensor, Tensor]:
    """Kernel contract of masked whitening: flat x, flat bool mask or None ->
    (out in the output dtype, number of valid tokens as a 0-d int64 tensor)."""
    x = x.to(_ragged.acc_dtype(x.dtype))
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    count = mask.sum()
    n = count.to(x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(mask, x, zero).sum() / n  # where, not x*mask: NaN garbage stays out
    centered = x - mean
    var = torch.where(mask, centered * centered, zero).sum() / (n - 1 if unbiased else n)
    out = centered * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean), count


_backends.register("masked_whiten", "reference")(reference_whiten_kernel)
_backends.register("masked_whiten", "cpp")(_backends.from_extension("masked_whiten_cpu"))


class WhitenArgs(NamedTuple):
    """The arguments of ``vapo::masked_whiten``."""

    x: Tensor
    mask: Tensor | None
    unbiased: bool
    eps: float
    shift_mean: bool
    backend: str


def _impl(a: WhitenArgs) -> Tensor:
    _ragged.check_float("x", a.x)
    _ragged.check_mask(a.mask, "x", a.x)
    mask = _ragged.as_bool_mask(a.mask)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    _, kernel = _backends.select("masked_whiten", a.x.device, a.backend)
    out, count = kernel(a.x.reshape(-1).contiguous(), flat_mask, a.unbiased, float(a.eps),
                        a.shift_mean)
    if _ragged.validation_enabled():
        n = int(count)
        if n == 0:
            raise ValueError("masked_whiten: mask selects no element; nothing to whiten")
        if a.unbiased and n == 1:
            raise ValueError("masked_whiten: mask selects one element; unbiased variance is undefined")
    return out.view(a.x.shape)


def _fake(a: WhitenArgs) -> Tensor:
    return torch.empty(a.x.shape, dtype=_ragged.acc_dtype(a.x.dtype), device=a.x.device)


masked_whiten_op = Op(
    "masked_whiten", WhitenArgs, "Tensor", _impl, _fake,
    setup_context=mark_outputs_constant, backward=no_gradient,
)


def masked_whiten(
    x: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    unbiased: bool = True,
    eps: float = 1e-8,
    shift_mean: bool = True,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """Whiten ``x`` with the mean and variance of its valid tokens (over the whole batch).

    ``unbiased`` picks the n-1 (verl) or n (OpenRLHF) variance; ``shift_mean=False`` adds
    the mean back. ``cu_seqlens`` is accepted so packed callers can pass the same
    arguments as to :func:`.gae.gae`; the statistics are batch-wide in both layouts, and
    any shape is accepted.

    ``process_group``: the mean and variance are those of the valid tokens of *every*
    process in the group (data parallelism), from one all-reduce of (count, sum, sum of
    squares) in float64; each process whitens its own ``x``. Not differentiable either.
    """
    if cu_seqlens is not None:
        layout = _ragged.check_layout({"x": x}, mask, cu_seqlens)
        _ragged.check_cu_seqlens_values(cu_seqlens, layout.num_tokens)
    _ragged.check_number("eps", eps, lambda v: 0 <= v < math.inf, "a finite float >= 0")
    if process_group is not None:
        return _whiten_over_group(x, mask, unbiased, eps, shift_mean, process_group)
    return masked_whiten_op(
        WhitenArgs(x, mask, bool(unbiased), float(eps), bool(shift_mean), backend or "")
    )


def _whiten_over_group(x: Tensor, mask: Tensor | None, unbiased: bool, eps: float,
                       shift_mean: bool, group) -> Tensor:
    """masked_whiten with statistics over all processes of ``group``.

    One all-reduce needs the moments as sums; float64 keeps sum(x^2) - n mean^2 from
    cancelling badly for the values whitened here (advantages: |mean| of the order of the
    standard deviation)."""
    import torch.distributed as dist

    _ragged.check_float("x", x)
    _ragged.check_mask(mask, "x", x)
    mask = _ragged.as_bool_mask(mask)
    with torch.no_grad():
        wide = x.detach().reshape(-1).to(torch.float64)
        valid = torch.ones_like(wide, dtype=torch.bool) if mask is None else mask.reshape(-1)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        picked = torch.where(valid, wide, zero)  # where, not x*mask: NaN garbage stays out
        moments = torch.stack([valid.sum().to(torch.float64), picked.sum(),
                               (picked * picked).sum()])
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=group)
        n, total, squares = moments.tolist()
        if _ragged.validation_enabled():
            if n == 0:
                raise ValueError("masked_whiten: mask selects no element on any process")
            if unbiased and n == 1:
                raise ValueError("masked_whiten: mask selects one element over all processes; "
                                 "unbiased variance is undefined")
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1 if unbiased else n)
        out_dtype = _ragged.acc_dtype(x.dtype)
        centered = wide - mean
        out = centered / math.sqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return out.to(out_dtype).view(x.shape)
