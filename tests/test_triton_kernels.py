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


def _token_loss_call(**change):
    """A valid direct call of the Triton token_loss (policy term, 2 sequences of 3 and 2
    tokens), with the named arguments replaced."""
    n = 5
    args = dict(
        logp=-torch.rand(n, device=DEVICE), old_logp=-torch.rand(n, device=DEVICE),
        advantages=torch.randn(n, device=DEVICE), values=None, old_values=None, returns=None,
        ref_logp=None, entropy=None, is_weights=None,
        mask=torch.ones(n, dtype=torch.bool, device=DEVICE),
        offsets=torch.tensor([0, 3, 5], device=DEVICE), seq_weight=torch.full((2,), 0.2, device=DEVICE),
        lm_weight=None, params=loss_spec.loss_params(), need_grad=True,
    )
    args.update(change)
    from vapo_kernels.triton import loss as tloss

    return tloss.token_loss(*args.values())


def test_token_loss_direct_call_runs():
    loss, sums, g_logp, _, _ = _token_loss_call()
    assert sums.shape == (loss_spec.L.NUM_SUMS,) and g_logp.shape == (5,)
    assert torch.equal(loss, loss_spec.L.loss_total(sums, loss_spec.loss_params()))


@pytest.mark.parametrize("change, match", [
    (dict(old_logp=-torch.rand(4)), "old_logp must have shape"),
    (dict(advantages=torch.randn(5, dtype=torch.float64)), "advantages has dtype"),
    (dict(logp=-torch.rand(1, 5)), "old_logp must have shape \\(1, 5\\) like logp"),
    (dict(advantages=torch.arange(5)), "advantages must be float"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), "mask must have shape"),
    (dict(mask=torch.ones(5)), "mask must be torch.bool"),
    (dict(offsets=torch.tensor([0.0, 5.0])), "offsets must be a 1-D int"),
    (dict(offsets=torch.tensor([0])), "no sequence"),
    (dict(seq_weight=torch.ones(3)), "seq_weight must have shape"),
    (dict(lm_weight=torch.ones(1)), "lm_weight must have shape"),
    (dict(params=[0.0] * 3), "params must have"),
])
def test_token_loss_direct_call_names_the_bad_argument(change, match):
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=match):
        _token_loss_call(**change)


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


def test_logits_loss_launch_parameters():
    from vapo_kernels.triton import logprobs as tlp
    from vapo_kernels.triton import loss as tloss

    default = tloss.LOGITS_INTERPRET_BLOCK_V if INTERPRET else tloss.LOGITS_GPU_BLOCK_V
    assert tloss.LOGITS_GPU_BLOCK_V == 8192
    assert tlp._launch_params(
        152064, None, gpu_block_v=tloss.LOGITS_GPU_BLOCK_V,
        interpret_block_v=tloss.LOGITS_INTERPRET_BLOCK_V,
    )[0] == default
    # Two sequences of 5-logit rows: a bad chunk width raises, and the default plan (a
    # chunk no wider than next_pow2(V)) gives the sums of an explicit 16-wide chunk.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, generator=gen, device=DEVICE)
    y = torch.tensor([4, 0, 2], device=DEVICE)
    tok = -torch.rand(3, generator=gen, device=DEVICE)
    adv = torch.randn(3, generator=gen, device=DEVICE)
    valid = torch.ones(3, dtype=torch.bool, device=DEVICE)
    offs = torch.tensor([0, 2, 3], device=DEVICE)
    sw = torch.tensor([0.5, 0.25], device=DEVICE)
    args = (z, y, tok, adv, None, None, valid, offs, sw, None,
            loss_spec.loss_params(entropy_coef=0.01), 1.0, None)
    with pytest.raises(ValueError, match="power of two"):
        tloss.logits_loss(*args, block_v=24)
    default_sums = tloss.logits_loss(*args)
    sums = tloss.logits_loss(*args, block_v=16)
    torch.testing.assert_close(default_sums, sums, rtol=1e-6, atol=1e-7)


def test_logits_loss_counts_an_ignored_target_on_a_valid_row_as_invalid():
    """Outside the contract (the op folds target -100 into the row's validity): Triton
    treats such a row as invalid, the same bits as with the row masked."""
    from vapo_kernels.triton import loss as tloss

    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(6, 37, generator=gen, device=DEVICE)
    y = torch.randint(0, 37, (6,), generator=gen, device=DEVICE)
    y[2] = -100
    old = -torch.rand(6, generator=gen, device=DEVICE)
    adv = torch.randn(6, generator=gen, device=DEVICE)
    offs = torch.tensor([0, 3, 6], device=DEVICE)
    sw = torch.tensor([0.5, 0.25], device=DEVICE)
    params = loss_spec.loss_params(dual_clip=3.0, entropy_coef=0.01)
    valid = torch.ones(6, dtype=torch.bool, device=DEVICE)
    grads = torch.empty_like(z), torch.empty_like(z)
    got = tloss.logits_loss(z, y, old, adv, None, None, valid, offs, sw, None, params, 0.7, grads[0])
    exp = tloss.logits_loss(z, y, old, adv, None, None, valid & (y != -100), offs, sw, None, params,
                            0.7, grads[1])
    assert torch.equal(got, exp) and torch.equal(grads[0], grads[1])
    assert (grads[0][2] == 0).all()
