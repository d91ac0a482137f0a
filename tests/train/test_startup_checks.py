"""Refusals at startup, before anything is built: one line each (ConfigError), never a
hang, a traceback or a late error after the warm-up."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.train.cli import _train
from vapo_kernels.train.config import ConfigError
from vapo_kernels.train.distributed import DataParallel

from .conftest import tiny_config


def two_processes() -> DataParallel:
    """Rank 0 of 2 with no real process group: the checks run before any collective."""
    return DataParallel(rank=0, world_size=2, group=object())


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_mc_advantage_is_refused_with_several_processes(tmp_path):
    # Each process ran a different number of per-length generate loops: FSDP deadlocked.
    with pytest.raises(ConfigError, match="--advantage: mc not supported with several"):
        _train(tiny_config(tmp_path, "--advantage", "mc"), two_processes())
    assert not (tmp_path / "run").exists()
