"""Small read-only device tensors reused across calls, and safe in a CUDA graph.

The ops pass kernels a few tensors that depend only on the call's options and shapes
(per-sequence constants, padded offsets, loss coefficients, the Triton loss scalars).
Made once and cached, they cost nothing per call and need no host-to-device copy. While
a CUDA graph is being captured the caches are bypassed: a graph would keep pointers into
a cache that may evict them, and a host copy cannot be captured; the tensors are then
made by device kernels (fills, arange) that the graph records and replays.

A leaf: imports only torch, so kernels can use it.
"""

from __future__ import annotations

import functools

import torch


_CPU = torch.device("cpu")


def capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on ``device``'s current stream. (CPU first: reading
    ``device.type`` makes a new string, ~0.3 us, on every op call.)"""
    return device != _CPU and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def full(size: int, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.full((size,), value)``, cached."""
    if capturing(device):
        return torch.full((size,), value, dtype=dtype, device=device)
    return _full(size, value, dtype, device)


def padded_offsets(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """int64 offsets ``[0, T, 2T, ..., B T]`` of a padded (B, T) batch, cached."""
    if capturing(device):
        return _padded_offsets.__wrapped__(batch, length, device)
    return _padded_offsets(batch, length, device)


def values(vector: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(vector, dtype)`` on ``device`` (each value rounded once from float64),
    cached; made with one fill per value while a graph is captured."""
    if capturing(device):
        out = torch.empty(len(vector), dtype=dtype, device=device)
        for i, v in enumerate(vector):
            out[i : i + 1].fill_(v)
        return out
    return _values(tuple(vector), dtype, device)


@functools.lru_cache(maxsize=256)
def _full(size, value, dtype, device):
    return torch.full((size,), value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _padded_offsets(batch, length, device):
    return torch.arange(batch + 1, dtype=torch.int64, device=device) * length


@functools.lru_cache(maxsize=256)
def _values(vector, dtype, device):
    return torch.tensor(vector, dtype=torch.float64).to(dtype).to(device)
