"""Data parallelism under ``torchrun``: the process group, FSDP2 sharding, global counts.

``torchrun --nproc-per-node N -m vapo_kernels.train ...`` starts N copies of the trainer.
Every process draws the same prompts from the same task generator and keeps its own
contiguous share of them (whole groups), so the union over processes is the batch one
process would train on. The loss op gets the *global* token / sequence counts of each
mini-batch and ``dp_size = N``: each process's loss is then N times its share of the global
loss, and FSDP's gradient average (a mean over the N processes) is exactly the gradient of
the global loss, in every aggregation mode. Advantage whitening takes its mean and variance
over all processes (``vk.masked_whiten(..., process_group=)``). Each process draws its own
sampling noise (seeded ``seed * 1_000_003 + rank``), so a run's numbers depend on the
process count from the first rollout on; one update on the same batch does not.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op on one
process and no process group is created.
"""

from __future__ import annotations

import os
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig
from .metrics import MEMORY_KEYS

SUMMED_METRICS = ("verifier_errors",)  # counts over all processes, not means


def reduction(key: str) -> str:
    """How a metric combines over the processes: counts add up; ranges (``*_min``,
    ``*_max``) and memory peaks are the extreme over the processes (a mean of maxima is
    no maximum); everything else is a mean (see :meth:`DataParallel.reduce_row`)."""
    if key in SUMMED_METRICS:
        return "sum"
    if key.endswith("_min"):
        return "min"
    if key.endswith("_max") or key in MEMORY_KEYS:
        return "max"
    return "mean"


@dataclass
class DataParallel:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # None on one process: no collective is ever called

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Sum (or max) a few numbers over the processes, in float64 (one collective)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                        group=self.group)
        return t.tolist()

    def gather(self, values: Sequence[float]) -> list[list[float]]:
        """Every process's ``values`` (the same length everywhere), in rank order, in float64
        (one collective)."""
        if not self.distributed:
            return [[float(v) for v in values]]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        return [p.tolist() for p in parts]

    def first_failure(self, failure: str | None) -> str | None:
        """The first (in rank order) of the processes' ``failure`` messages (None: that
        process's part went well) on every process, None when none failed; a barrier too
        (one all_gather_object). A process whose own part failed meets the others here
        instead of raising alone while they wait for it in their next collective."""
        if not self.distributed:
            return failure
        failures: list[str | None] = [None] * self.world_size
        dist.all_gather_object(failures, failure, group=self.group)
        return next((f for f in failures if f is not None), None)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every process: for decisions every
        process must take alike, from numbers that could differ between them."""
        if not self.distributed:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0, group=self.group)
        return shared[0]

    @property
    def device(self) -> torch.device:
        if self.distributed and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, items: list, what: str = "prompts_per_step") -> list:
        """This process's contiguous share of ``items`` (the same length on every process)."""
        if len(items) % self.world_size:
            raise ConfigError(what, f"{len(items)} items do not split evenly over "
                              f"{self.world_size} processes")
        per = len(items) // self.world_size
        return items[self.rank * per:(self.rank + 1) * per]

    def reduce_row(self, row: dict[str, Any], weights: dict[str, float] | None = None,
                   combined: Container[str] = ()) -> dict[str, Any]:
        """A metrics row over every process (its numeric entries; one collective).

        Each key combines as :func:`reduction` says: counts are summed, ``*_min`` /
        ``*_max`` and memory peaks are the min / max over the processes, the rest a mean,
        which is exact for the loss terms (each process reports N x its share of the global
        loss) and for means over equal shares (reward, response length). A key in
        ``weights`` (this process's weight of it, e.g. the tokens a token-weighted rate
        was taken over) is the weighted mean instead, the rate over every process's
        tokens. Keys in ``combined`` are global already and left as they are."""
        if not self.distributed:
            return row
        keys = sorted(k for k, v in row.items() if k not in combined
                      and isinstance(v, (int, float)) and not isinstance(v, bool))
        weights = weights or {}
        weighted = [k for k in keys if k in weights and reduction(k) == "mean"]
        table = self.gather([row[k] for k in keys] + [weights[k] for k in weighted])
        column = {k: [r[i] for r in table] for i, k in enumerate(keys)}
        weight = {k: [r[len(keys) + i] for r in table] for i, k in enumerate(weighted)}
        out = dict(row)
        for key, values in column.items():
            how = reduction(key)
            if key in weight:
                out[key] = sum(v * w for v, w in zip(values, weight[key])) / sum(weight[key])
            elif how == "mean":
                out[key] = sum(values) / len(values)
            else:
                out[key] = {"sum": sum, "min": min, "max": max}[how](values)
        return out


def from_environment(config: TrainConfig) -> DataParallel:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` set), else one process."""
    if "WORLD_SIZE" not in os.environ:
        return DataParallel()
    backend = config.distributed.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and config.run.device != "cpu" else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        group=dist.group.WORLD)


def shutdown(dp: DataParallel) -> None:
    """Leave the process group after a run that ended normally on every process: the
    barrier first (gloo teardown without it aborted ~1 in 6). Never call this while an
    exception propagates: the other processes may be waiting in a collective this one
    will not join, so the barrier (or a teardown waiting for their work) would hang until
    the collective timeout (30 min) with the error unprinted. Exiting with the traceback
    closes this process's connections and torchrun stops the others."""
    if dp.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: transformers lists their classes in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def prepare_model(model: torch.nn.Module, config: TrainConfig, dp: DataParallel) -> torch.nn.Module:
    """Activation checkpointing (when asked) and, with several processes, FSDP2 sharding:
    ``fully_shard`` per decoder layer, then the root (the usual FSDP2 wrapping)."""
    d = config.distributed
    if d.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not dp.distributed:
        if d.mixed_precision != "none":
            raise ConfigError("mixed-precision", "FSDP2 mixed precision needs torchrun "
                              "(data-parallel processes)")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if d.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError("model", f"{type(model).__name__} lists no decoder layer class "
                          "(_no_split_modules) to shard with FSDP2")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
