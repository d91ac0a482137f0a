"""The loss kernels' two vectors, defined once for every backend.

Every backend of ``vapo::token_loss`` and ``vapo::logits_loss`` receives the scalar
options as one ``params`` vector (floats, ``P_*`` slots) and returns one ``sums`` vector
(``S_*`` slots). This module is their only definition:

* the ops (``vapo_kernels.ops``) and the reference kernels index them by these names;
* the Triton kernels read the same names as ``L.S_PG``-style module attributes (Triton
  resolves a module's integer attributes at compile time, as constants);
* the C++ kernels include ``csrc/cpu/loss_layout.h``, which :func:`cpp_header` writes
  from this module; ``python -m vapo_kernels.build --write-layout`` rewrites it and a
  test fails when the committed header differs.

A leaf: it imports only torch and the leaf ``_device_cache``, so kernels can import it.
"""

from __future__ import annotations

import torch

from . import _device_cache

# ``params``: the options of one call.
P_CLIP_LOW = 0  # eps_low: the ratio's lower bound is 1 - eps_low
P_CLIP_HIGH = 1  # eps_high (Clip-Higher): upper bound 1 + eps_high
P_DUAL_CLIP = 2  # c > 1 of dual clip, 0 when off
P_RATIO_CLAMP = 3  # C: the log-ratio is clamped to [-C, C] before exp
P_VALUE_CLIP = 4  # eps_v of the clipped value loss, < 0 for the unclipped loss
P_VALUE_CLIP_OPENRLHF = 5  # 1: OpenRLHF's clip form, 0: verl's
P_KL_KIND = 6  # KL estimator code (KL_CODES), 0 when the KL term is off
P_KL_STRAIGHT = 7  # 1: straight-through "+" kind (k2's gradient)
P_VF_COEF = 8
P_KL_COEF = 9
P_ENTROPY_COEF = 10
P_LM_COEF = 11
# Rollout correction (importance weights of the rollout engine's log-probs, which the
# kernels then read in the is_weights slot): the level's code (ROLLOUT_IS_CODES), 0 off.
P_ROLLOUT_IS = 12
P_ROLLOUT_IS_MASK = 13  # 1: reject weights outside [lower, upper]; 0: truncate at upper
P_ROLLOUT_IS_UPPER = 14  # C > 0: the weights' upper bound
P_ROLLOUT_IS_LOWER = 15  # the lower bound of mask mode (0 in truncate mode)
NUM_PARAMS = 16

# ``sums``: S_PG..S_LM are the weighted loss terms before their coefficients; the rest
# are plain sums over the valid tokens (ratio min / max: +inf / -inf when no valid token
# has a policy term; the returns and value-error sums only when the value term is on;
# the S_ROLLOUT_* slots only when the rollout correction is on, 0 otherwise, their min /
# max +inf / -inf when it is on and no token is valid).
S_PG = 0
S_VF = 1
S_KL = 2
S_ENTROPY = 3
S_LM = 4
S_TOKENS = 5
S_CLIP_LOW = 6
S_CLIP_HIGH = 7
S_DUAL_CLIP = 8
S_NEG_LOG_RATIO = 9
S_K3 = 10
S_RATIO_SUM = 11
S_RATIO_MIN = 12
S_RATIO_MAX = 13
S_VF_CLIP = 14
# The two *_SQ slots are centred: sums of squared deviations from the mean over the valid
# tokens, which a sum of squares loses to rounding when |R| is far above its spread (fp32
# R^2 of R ~ 1e4 is off by ~6 per token). Each backend merges its partial sums so.
S_RETURNS = 15  # sum of R
S_RETURNS_SQ = 16  # sum of (R - mean R)^2
S_VALUE_ERR = 17  # sum of R - v
S_VALUE_ERR_SQ = 18  # sum of (R - v - mean(R - v))^2
S_ROLLOUT_IS_RAW = 19  # sum of the rollout IS weights before truncation / rejection
S_ROLLOUT_IS_WEIGHT = 20  # sum of the weights applied (truncated; 0 where rejected)
S_ROLLOUT_IS_MIN = 21  # min of the weights before truncation / rejection
S_ROLLOUT_IS_MAX = 22  # max of the weights before truncation / rejection
S_ROLLOUT_IS_OUT = 23  # count of tokens truncated (w > upper) or rejected (outside bounds)
S_ROLLOUT_KL = 24  # sum of rollout_logp - old_logp (the clamped log-ratio, negated)
S_ROLLOUT_K3 = 25  # sum of expm1(d) - d, d = old_logp - rollout_logp clamped
NUM_SUMS = 26

# The loss from the sums: sum over the terms of sign * coefficient * sums[slot], where the
# coefficient is params[param] (1 for the policy term, which has none). A term whose
# coefficient is 0 still enters (0 * NaN = NaN keeps the NaN screen of its input); the
# metric slots, which hold +-inf for empty batches, never do.
LOSS_TERMS = (  # (sum slot, params slot or -1, sign)
    (S_PG, -1, 1),
    (S_VF, P_VF_COEF, 1),
    (S_KL, P_KL_COEF, 1),
    (S_ENTROPY, P_ENTROPY_COEF, -1),
    (S_LM, P_LM_COEF, 1),
)


def term_coefficients(params) -> tuple[float, ...]:
    """The coefficient of each of LOSS_TERMS' sums (slots S_PG..S_LM, in order)."""
    return tuple(sign * (1.0 if param < 0 else params[param]) for _, param, sign in LOSS_TERMS)


def loss_total(sums: torch.Tensor, params) -> torch.Tensor:
    """The 0-d loss of the kernel contract from ``sums``: LOSS_TERMS added in float64, in
    slot order, from the sums as rounded to their dtype, then rounded once - the C++
    kernels' loss_from_sums, bit for bit (a cumsum adds in order; a dot product need not).
    The coefficients are a cached device tensor: no host-to-device copy, so no sync."""
    coefs = _device_cache.values(term_coefficients(params), torch.float64, sums.device)
    total = (sums[S_PG : S_LM + 1].double() * coefs).cumsum(0)[-1]
    return total.to(sums.dtype, copy=True)  # its own storage, not a view into the cumsum


# KL estimator codes of P_KL_KIND; a trailing "+" on a kind sets P_KL_STRAIGHT.
KL_CODES = {"k1": 1, "kl": 1, "abs": 2, "k2": 3, "mse": 3, "k3": 4, "low_var_kl": 4}

# Rollout IS level codes of P_ROLLOUT_IS (0: off).
ROLLOUT_IS_CODES = {"token": 1, "sequence": 2, "geometric": 3}


def constants() -> dict[str, int]:
    """Every P_*, S_* and NUM_* constant of this module, in slot order."""
    return {
        name: value
        for name, value in globals().items()
        if name.startswith(("P_", "S_", "NUM_")) and isinstance(value, int)
    }


def cpp_header() -> str:
    """The text of ``csrc/cpu/loss_layout.h``."""
    lines = [
        "// Generated from vapo_kernels/_loss_layout.py by",
        "// `python -m vapo_kernels.build --write-layout`: edit the Python module, not this.",
        "#pragma once",
        "",
        "namespace vapo {",
        "",
    ]
    lines += [f"constexpr int {name} = {value};" for name, value in constants().items()]
    lines += [
        "",
        "// LOSS_TERMS: loss = sum_k TERM_SIGN[k] * coefficient_k * sums[TERM_SUM[k]], where",
        "// coefficient_k = params[TERM_PARAM[k]], or 1 where TERM_PARAM[k] < 0.",
        f"constexpr int NUM_TERMS = {len(LOSS_TERMS)};",
        "constexpr int TERM_SUM[NUM_TERMS] = {"
        + ", ".join(str(slot) for slot, _, _ in LOSS_TERMS) + "};",
        "constexpr int TERM_PARAM[NUM_TERMS] = {"
        + ", ".join(str(param) for _, param, _ in LOSS_TERMS) + "};",
        "constexpr double TERM_SIGN[NUM_TERMS] = {"
        + ", ".join(f"{sign:.1f}" for _, _, sign in LOSS_TERMS) + "};",
    ]
    lines += ["", "}  // namespace vapo", ""]
    return "\n".join(lines)
