"""vapo-kernels: fused, exact kernels for PPO/VAPO-style RL of LLMs.

Public API (everything else is internal):

* :func:`gae`, :func:`decoupled_gae`, :func:`masked_whiten`, :func:`length_adaptive_lambda`
  - GAE as a fused reverse scan over ragged sequences (``torch.ops.vapo.gae``);
* :func:`token_logprobs` - log-probs (and entropy) of target tokens from logits, with
  autograd and an optional in-place backward (``torch.ops.vapo.token_logprobs``);
* :func:`policy_loss`, :func:`value_loss`, :func:`vapo_loss`, :func:`kl_loss`,
  :func:`kl_penalty`, :func:`agg_loss`, :func:`positive_lm_loss` - PPO/VAPO losses in one
  fused pass with metrics (``torch.ops.vapo.token_loss``); :func:`policy_loss_from_logits`
  and :func:`policy_loss_from_hidden` go from logits / hidden states to the loss;
* :func:`available_backends`, :func:`set_validation`, :func:`validation_enabled` - backend
  and input-check control.

Peer-compatible drop-ins live in :mod:`vapo_kernels.compat`.
"""

from . import _backends
from ._ragged import set_validation, validation_enabled
from .ops.gae import decoupled_gae, gae, length_adaptive_lambda
from .ops.linear_logprobs import linear_logprobs
from .ops.token_logprobs import token_logprobs
from .ops.hidden_loss import policy_loss_from_hidden
from .ops.logits_loss import policy_loss_from_logits
from .ops.loss_spec import kl_penalty
from .ops.whiten import masked_whiten
from .ops.token_loss import (
    agg_loss,
    kl_loss,
    policy_loss,
    positive_lm_loss,
    value_loss,
    vapo_loss,
)

__version__ = "0.1.0"


def available_backends(op: str = "gae", device="cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` now (compiles the C++ extension if needed)."""
    return _backends.available(op, device)


__all__ = [
    "agg_loss",
    "available_backends",
    "decoupled_gae",
    "gae",
    "kl_loss",
    "kl_penalty",
    "length_adaptive_lambda",
    "linear_logprobs",
    "masked_whiten",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "positive_lm_loss",
    "set_validation",
    "token_logprobs",
    "validation_enabled",
    "value_loss",
    "vapo_loss",
]
