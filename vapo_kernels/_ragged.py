"""Validation and layout helpers shared by every op family.

Two layouts are accepted everywhere:

* padded: token tensors of shape ``(B, T)``, an optional ``mask`` of the same shape;
* packed: token tensors of shape ``(N,)`` plus ``cu_seqlens`` (int32 or int64, ``S + 1``
  offsets starting at 0, non-decreasing, ending at N, as in flash-attn's varlen API),
  and an optional per-token ``mask`` of shape ``(N,)``.

Checks come in two kinds. *Static* checks (shapes, dtypes, devices, scalar ranges) only
look at metadata, so they also run on fake tensors and under ``torch.compile``.
*Data* checks (offsets, NaN in valid slots, per-sequence lambda ranges) read tensor
values; they run inside the op bodies, where ``torch.compile`` treats them as opaque.
They can be switched off for production runs with ``VAPO_VALIDATE=0`` or
:func:`set_validation` (each data check costs a device sync on GPU).
"""

from __future__ import annotations

import numbers
import operator
import re
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _device_cache, _env

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_validate_data = _env.flag("VAPO_VALIDATE", True)


def set_validation(enabled: bool) -> None:
    """Turn the data-dependent input checks on or off (they are on by default)."""
    global _validate_data
    if not isinstance(enabled, bool):  # bool("off") is True: a string would turn them on
        raise TypeError(f"set_validation: enabled must be True or False, got {enabled!r}")
    _validate_data = enabled


def validation_enabled() -> bool:
    return _validate_data


class Layout(NamedTuple):
    """What the token tensors look like: ``padded`` (B, T) or ``packed`` (N,) + offsets.
    (A NamedTuple: made on every op call, ~1 us cheaper than a frozen dataclass.)"""

    packed: bool
    num_seqs: int
    num_tokens: int


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute and output dtype of the kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_number(name: str, x, ok: Callable[[float], bool], expected: str) -> None:
    """``x`` is a real number (not a bool; numpy scalars count) for which ``ok`` holds,
    else a ValueError naming it and what was ``expected``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not ok(x):
        raise ValueError(f"{name} must be {expected}, got {x!r}")


def check_unit_interval(name: str, x: float) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not 0.0 <= float(x) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {x}")


def check_layout(
    tensors: dict[str, torch.Tensor],
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> Layout:
    """Static checks of the token tensors, mask and offsets; returns the layout.

    ``tensors`` maps argument names to float token tensors; the first is the reference
    for shape and device.
    """
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items:
        check_float(name, t)
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")

    check_mask(mask, first_name, first)

    if cu_seqlens is None:
        if first.dim() != 2:
            raise ValueError(
                f"{first_name} must be 2-D (B, T) when cu_seqlens is None, "
                f"got shape {tuple(first.shape)}; pass cu_seqlens for packed 1-D input"
            )
        return Layout(packed=False, num_seqs=first.shape[0], num_tokens=first.numel())

    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != first.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {first_name} is on {first.device}")
    if first.dim() != 1:
        raise ValueError(
            f"{first_name} must be 1-D (N,) packed tokens when cu_seqlens is given, "
            f"got shape {tuple(first.shape)}"
        )
    return Layout(packed=True, num_seqs=cu_seqlens.shape[0] - 1, num_tokens=first.shape[0])


def plain_layout(
    tensors: tuple, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> Layout | None:
    """The layout of the common call, checked in one pass, or None to send the call
    through :func:`check_layout` and the conversions. Common: the token tensors (``None``
    entries skipped, at least one given) are plain contiguous ``torch.Tensor`` of one
    float dtype, shape and device; the mask is None or a contiguous bool tensor like
    them; padded 2-D, or packed 1-D with contiguous int32 / int64 ``cu_seqlens`` whose
    values check. A layout returned here is one :func:`check_layout` and
    :func:`check_cu_seqlens_values` would accept, for inputs that :func:`as_bool_mask`
    and :func:`dense` leave as they are - the same kernel call follows. (At micro-batch
    sizes the general checks, one function per question, cost more than the kernel.)"""
    first = None
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or not t.is_contiguous():
            return None
        if first is None:
            first, dtype, shape, device = t, t.dtype, t.shape, t.device
            if dtype not in _FLOAT_DTYPES:
                return None
        elif t.dtype != dtype or t.shape != shape or t.device != device:
            return None
    if first is None:
        return None
    if mask is not None and (
        type(mask) is not torch.Tensor or mask.dtype != torch.bool or mask.shape != shape
        or mask.device != device or not mask.is_contiguous()
    ):
        return None
    if cu_seqlens is None:
        if len(shape) != 2:
            return None
        return Layout(False, shape[0], shape[0] * shape[1])
    if (type(cu_seqlens) is not torch.Tensor
            or (cu_seqlens.dtype != torch.int64 and cu_seqlens.dtype != torch.int32)
            or cu_seqlens.dim() != 1 or len(shape) != 1 or cu_seqlens.shape[0] < 1
            or cu_seqlens.device != device or not cu_seqlens.is_contiguous()):
        return None
    check_cu_seqlens_values(cu_seqlens, shape[0])
    return Layout(True, cu_seqlens.shape[0] - 1, shape[0])


def named_as(fn: Callable, **names: str) -> Callable:
    """``fn`` whose ValueError / TypeError names the arguments as its caller's signature
    does: ``names`` maps ``fn``'s argument names to the caller's (``gae``'s one ``lam`` is
    ``decoupled_gae``'s ``lam_policy`` and ``lam_critic``; verl's ``compute_value_loss``
    passes ``vpreds`` as our ``values``).

    Only the message changes (the exception keeps its type, traceback and cause). Every
    name is replaced in one pass - ``values -> vpreds`` with ``old_values -> values``
    must not turn the new ``values`` into ``vpreds`` - and only as a whole word
    (``mask``, not the one in ``masked_whiten`` or ``response_mask``). A wrapper, not a
    context manager: ~0.3 us a call, and dynamo traces it.
    """
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as e:
            # Dynamo cannot rewrite an exception while it traces; without fullgraph it
            # runs the call again eagerly, which renames.
            if e.args and isinstance(e.args[0], str) and not torch.compiler.is_compiling():
                e.args = (pattern.sub(lambda m: names[m.group(1)], e.args[0]), *e.args[1:])
            raise

    return call


def check_mask(mask: torch.Tensor | None, like_name: str, like: torch.Tensor) -> None:
    """A mask is None or a bool/int/float tensor with the shape and device of ``like``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or real float, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {like_name} has {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {like_name} is on {like.device}")


# Up to this many offsets are checked as a Python list (the Python loop is faster than
# the tensor ops below for a few hundred sequences, slower beyond).
_FEW_OFFSETS = 512


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """Data check: offsets start at 0, never decrease and end at N."""
    if not _validate_data:
        return
    if cu_seqlens.numel() <= _FEW_OFFSETS:
        # A micro-batch's few offsets: one read into Python, checked there (~2 us; the
        # tensor checks below are ~7 tensor ops, ~15 us). Any failure takes the tensor
        # path below, which names it.
        cu = cu_seqlens.tolist()
        if cu[0] == 0 and cu[-1] == num_tokens and all(map(operator.le, cu, cu[1:])):
            return
    cu = cu_seqlens.to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0].item()}")
    if cu[-1].item() != num_tokens:
        raise ValueError(
            f"cu_seqlens must end at the number of tokens N={num_tokens}, got {cu[-1].item()}"
        )
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        bad = int(torch.nonzero(cu[1:] < cu[:-1])[0].item())
        raise ValueError(
            f"cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}]={cu[bad + 1].item()} "
            f"< cu_seqlens[{bad}]={cu[bad].item()}"
        )


def check_no_nan_where_valid(name: str, t: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Data check: NaN in a valid slot is an error; garbage in masked slots is ignored."""
    _refuse_where_valid(torch.isnan, t, mask, f"{name} contains NaN at valid (unmasked) positions")


def check_no_inf_where_valid(name: str, t: torch.Tensor, mask: torch.Tensor | None,
                             output: str) -> None:
    """Data check, for an ``output`` that came out NaN or infinite: ``t`` holds an
    infinity at a valid position (the likely cause)."""
    _refuse_where_valid(torch.isinf, t, mask, f"{name} contains ±inf at valid (unmasked) "
                        f"positions, which makes {output} NaN or infinite")


def _refuse_where_valid(test, t: torch.Tensor, mask: torch.Tensor | None, message: str) -> None:
    if not _validate_data:
        return
    bad = test(t)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        raise ValueError(message)


def name_nonfinite_input(named_inputs, mask: torch.Tensor | None, output: str) -> None:
    """For an ``output`` that came out NaN (or infinite) with validation on: raise naming
    the first of ``named_inputs`` ((name, tensor or None) pairs of the mask's shape) with
    a NaN, else one with an infinity, at a valid position. Returns when every valid input
    is finite: the caller then says what overflowed."""
    named_inputs = [(name, t) for name, t in named_inputs if t is not None]
    for name, t in named_inputs:
        check_no_nan_where_valid(name, t, mask)
    for name, t in named_inputs:
        check_no_inf_where_valid(name, t, mask, output)


def is_callers_leaf(t: torch.Tensor) -> bool:
    """``t`` is a leaf tensor or a view of one: memory the caller owns, which an
    ``inplace_backward`` must not overwrite."""
    return t.is_leaf or (t._base is not None and t._base.is_leaf)


def as_bool_mask(
    mask: torch.Tensor | None, name: str = "mask", selects: str = "tokens"
) -> torch.Tensor | None:
    """The bool form of a bool / int / float 0-1 mask (of tokens, or of the sequences it
    ``selects``). Any other value (a float mask of 0.5 is a weight, not a mask) is refused,
    naming the argument, when data checks are on."""
    if mask is None:
        return mask
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        check_mask(mask, name, mask)  # names the wrong type
    if mask.dtype == torch.bool:
        return mask
    keep = mask != 0
    if (_validate_data and mask.numel() and not mask.is_meta  # meta: no values to check
            and not bool((keep == (mask == 1)).all())):
        bad = mask[keep != (mask == 1)][0].item()
        raise ValueError(
            f"{name} must hold only 0 and 1 (it selects {selects}; it is not a weight), "
            f"got {bad}"
        )
    return keep


def offsets(
    layout: Layout, shape: torch.Size, cu_seqlens: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """int64 sequence offsets into the flattened token tensor, for either layout. The
    padded layout's offsets are cached per shape and device (kernels only read them)."""
    if layout.packed:
        cu = cu_seqlens.to(torch.int64)  # no op where it is int64 already
        return cu if cu.is_contiguous() else cu.contiguous()  # kernels index a flat array
    return _device_cache.padded_offsets(shape[0], shape[1], device)


def dense(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` contiguous and of ``dtype``, in its shape: what the kernels read (they take
    any shape and count tokens in memory order). ``t`` itself where it already is (a
    view or a call per input costs as much as a small kernel); None stays None."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def pack_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, fill=0) -> torch.Tensor:
    """(N,) packed -> (S, max_len) right-padded with ``fill``."""
    cu = cu_seqlens.to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    width = int(lengths.max().item()) if lengths.numel() else 0
    out = x.new_full((lengths.numel(), width), fill)
    for s in range(lengths.numel()):
        out[s, : lengths[s]] = x[cu[s] : cu[s + 1]]
    return out


def padded_to_pack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_to_padded`."""
    cu = cu_seqlens.to("cpu", torch.int64)
    lengths = (cu[1:] - cu[:-1]).tolist()
    if not lengths:
        return x.new_empty((0,))
    return torch.cat([x[s, :n] for s, n in enumerate(lengths)])
