r"""The policy loss from hidden states and the LM head: no N x V tensor, ever.

:func:`policy_loss_from_hidden` composes the fused LM-head kernels
(``vapo::linear_logprobs`` and its backward, :mod:`.logprobs`) with ``vapo::token_loss``:
the forward computes per-token log-probs and entropies from tiles of the matmul, the
token-loss op returns the loss with d loss / d logp and d loss / d H (it writes them in
its forward), and the LM-head backward turns those into the gradients of hidden, weight
and bias - all inside the forward pass; the backward only scales them. Only per-token
vectors (4 bytes x N) pass between the kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import _ragged
from .._library import loss_from_gradients
from . import loss_spec
from .linear_logprobs import (
    LinearLogprobsArgs,
    LinearLogprobsBackwardArgs,
    linear_logprobs_backward_op,
    linear_logprobs_op,
    name_nonfinite_input,
)
from .logits_loss import (
    check_flat_input,
    logp_loss_metrics,
    logp_loss_options,
    loss_mask,
)
from .token_logprobs import check_temperature, masked_targets
from .token_loss import TokenLossArgs, token_loss_op


def _loss_and_grads(hidden, weight, bias, targets, old_logp, advantages, mask, cu_seqlens,
                    temperature, backend, o, need_h, need_w):
    """``(loss, sums, grad_hidden, grad_weight, grad_bias)``; gradients None unless asked."""
    need_grad = need_h or need_w
    logp, entropy, stats = linear_logprobs_op(
        LinearLogprobsArgs(hidden, weight, bias, targets, mask, temperature, backend)
    )
    with_entropy = o["params"][loss_spec.L.P_ENTROPY_COEF] != 0.0
    a = TokenLossArgs(
        logp, old_logp, advantages, None, None, None, o["ref_logp"], entropy,
        o["weights_slot"], loss_mask(mask, targets), cu_seqlens, o["positive"], o["params"],
        o["agg"], *o["aggregation"], need_grad, backend,
    )
    try:
        loss, sums, g_logp, _, g_entropy = token_loss_op(a)
    except ValueError:
        name_nonfinite_input(hidden, weight, bias, a.mask)
        raise
    if not need_grad:
        return loss, sums, None, None, None
    gh, gw, gb = linear_logprobs_backward_op(LinearLogprobsBackwardArgs(
        g_logp, g_entropy if with_entropy else None, hidden, weight, bias, targets, mask, stats,
        entropy, temperature, need_h, need_w, backend,
    ))
    return loss, sums, gh if need_h else None, gw if need_w else None, (
        gb if (bias is not None and need_w) else None
    )


def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    **kw,
) -> tuple[Tensor, Mapping[str, Tensor]]:
    """Policy loss from hidden states ``(N, H)`` packed (with ``cu_seqlens``) or
    ``(B, T, H)`` padded and the LM head ``weight`` ``(V, H)`` (+ ``bias``):
    ``(loss, metrics)``. The N x V logits never exist (forward or backward); the
    gradients of hidden, weight and bias are computed in the forward pass. Keyword terms
    as in :func:`.logits_loss.policy_loss_from_logits`."""
    o = logp_loss_options(kw)
    check_flat_input("hidden", hidden, cu_seqlens)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        targets = masked_targets(targets, weight.shape[0], mask)
    rest = (targets, old_logp, advantages, mask, cu_seqlens, check_temperature(temperature),
            backend or "")
    need_h = hidden.requires_grad
    need_w = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not ((need_h or need_w) and torch.is_grad_enabled()):
        loss, sums, *_ = _loss_and_grads(hidden, weight, bias, *rest, o, False, False)
        return loss, logp_loss_metrics(o, sums)
    with torch.no_grad():  # the gradients come from the kernels: the graph is one node
        loss, sums, *grads = _loss_and_grads(hidden, weight, bias, *rest, o, need_h, need_w)
    pairs = [(t, g) for t, g in zip((hidden, weight, bias), grads)
             if t is not None and t.requires_grad]
    loss = loss_from_gradients(loss, [t for t, _ in pairs], [g for _, g in pairs], "hidden_loss")
    return loss, logp_loss_metrics(o, sums)
