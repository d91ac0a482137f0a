"""The Triton kernels' own launch machinery: their block / chunk arguments and default
plans, which no other backend has.

Their results against the float64 spec are checked with every other backend's, in the
family files (test_loss_kernel.py, test_logprobs.py, test_logits_loss.py), with small
blocks so that boundaries fall inside the test shapes. Without a GPU through the
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import pytest
import torch

from vapo_kernels.ops import loss_spec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def test_token_loss_block_must_be_a_power_of_two():
    from vapo_kernels.triton import loss as tloss

    x = [None] * 9
    x[7] = torch.zeros(4, device=DEVICE)  # entropy
    offs = torch.tensor([0, 4], device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        tloss.token_loss(
            *x, None, offs, torch.ones(1, device=DEVICE), None, loss_spec.loss_params(), True,
            block=24,
        )


def test_logprobs_launch_parameters():
    from vapo_kernels.triton import logprobs as tlp

    default = tlp.INTERPRET_BLOCK_V if INTERPRET else tlp.GPU_BLOCK_V
    assert tlp._launch_params(152064, None)[0] == default
    # The GPU plan, checked whatever device runs the test.
    assert (tlp.GPU_BLOCK_V, tlp.MAX_NUM_WARPS) == (8192, 16)
    assert tlp._launch_params(152064, 8192) == (8192, 16)
    assert tlp._launch_params(152064, 4096) == (4096, 8)
    assert tlp._launch_params(1000, 1024) == (1024, 2)
    assert tlp._launch_params(1, 16) == (16, 1)
    assert tlp._launch_params(1, None)[0] == 1  # a chunk no wider than the row
    with pytest.raises(ValueError, match="power of two"):
        tlp._launch_params(100, 24)
