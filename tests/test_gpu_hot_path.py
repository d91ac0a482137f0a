"""On a GPU, the per-micro-batch hot path with validation off: no host-device sync, and
the ops captured in a CUDA graph replay to the eager results. A trainer's step time on a
GPU is set by this path, not the kernels, at micro-batch sizes. Skipped without CUDA
(benchmarks/gpu_check.sh runs it on a lent GPU: ``-m gpu``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels import _ragged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def no_validation():
    was = _ragged.validation_enabled()
    vk.set_validation(False)
    yield
    vk.set_validation(was)


def _batch(seed=0, batch=8, length=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch, 1), device="cuda", generator=g)
    mask = torch.arange(length, device="cuda")[None, :] < lengths
    rewards = torch.zeros(batch, length, device="cuda")
    rewards[:, -1] = torch.rand(batch, device="cuda", generator=g)
    logp = -torch.rand(batch, length, device="cuda", generator=g)
    return SimpleNamespace(
        rewards=rewards, values=torch.randn(batch, length, device="cuda", generator=g),
        old_values=torch.randn(batch, length, device="cuda", generator=g), mask=mask,
        logp=logp, old_logp=logp + 0.05 * torch.randn(batch, length, device="cuda", generator=g),
    )


def _step(x):
    """What a VAPO trainer calls per micro-batch: decoupled GAE, then the whole loss."""
    adv, ret = vk.decoupled_gae(x.rewards, x.values, x.mask, alpha=0.05)
    loss, metrics = vk.vapo_loss(
        x.logp, x.old_logp, adv, x.mask, values=x.values, old_values=x.old_values, returns=ret,
    )
    return adv, ret, loss, metrics["clipfrac"], metrics["explained_var"]


def test_hot_path_never_waits_for_the_device(no_validation):
    x = _batch()
    x.logp.requires_grad_()
    _step(x)[2].backward()  # warm-up: compiles the kernels, fills the per-shape caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync on the path below raises
    try:
        out = _step(x)
        out[2].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out[2]).item() and x.logp.grad is not None


def test_ops_replay_from_a_cuda_graph(no_validation):
    static = _batch(seed=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        for _ in range(3):
            _step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(static)
    fresh = _batch(seed=1)
    for name, t in vars(fresh).items():
        getattr(static, name).copy_(t)
    graph.replay()
    eager = _step(fresh)
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        assert torch.equal(c, e)
