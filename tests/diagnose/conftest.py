"""Shared fixtures of the diagnostics tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    """Hugging Face progress bars off; one torch thread, as the tiny preset's ``--threads
    1`` (on models this small a second thread costs 2-3x the CPU time on a loaded 2-core
    machine); the thread count of the tests that run after these is restored."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
