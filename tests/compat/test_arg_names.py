"""Errors raised through an adapter name the argument the user passed, as the peer's
signature calls it - never the name of our function's argument it was passed to (README,
"API conventions"). No peer is imported: only the adapters' own messages are checked.

Also here: ``normalize_advantages`` refuses a fractional mask like every other adapter,
and ``compat.set_backend`` checks its name when it is set.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from vapo_kernels import compat
from vapo_kernels.compat import nemo, openrlhf, torchrl, trl, verl

B, T = 2, 4


def data():
    return torch.randn(B, T, generator=torch.Generator().manual_seed(0))


def nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")  # a valid slot: every mask below keeps token 0
    return t


MASK = torch.ones(B, T, dtype=torch.bool)
NO_PAD = torch.zeros(B, T, dtype=torch.bool)  # TRL's padding masks: nothing padded
SEQ_LENS = torch.tensor([T - 1, 1])  # TRL: index of each row's last response token


class Config(dict):
    """The fields of verl's ActorConfig that its policy loss reads."""

    __getattr__ = dict.__getitem__


def verl_config(**fields):
    return Config({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None,
                   "clip_ratio_c": 3.0, "global_batch_info": {}}, **fields)


def with_bad(call, names, poisoned):
    """``call`` with the tensors ``names`` (the peer's names, in call order), ``poisoned``
    one holding NaN in a valid slot."""
    return lambda: call(*(nan(data()) if n == poisoned else data() for n in names))


# --------------------------------------------------------------------------------------
# A NaN in each NaN-checked input: (adapter, peer argument, our argument it is passed to)


def _verl_policy(old_log_prob, log_prob, advantages, rollout_is_weights):
    return verl.compute_policy_loss_vanilla(
        old_log_prob, log_prob, advantages, MASK, "token-mean", verl_config(), rollout_is_weights
    )


def _verl_policy_deprecated(old_log_prob, log_prob, advantages):
    return verl.compute_policy_loss(old_log_prob, log_prob, advantages, MASK, cliprange=0.2)


def _trl_ppo(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return):
    return trl.ppo_loss(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return,
                        NO_PAD, NO_PAD, 0.2, 0.2, 0.1)


def _torchrl(state_value, next_state_value, reward):
    shape = (B, T, 1)  # TorchRL's [*B, T, F]
    done = torch.zeros(shape, dtype=torch.bool)
    return torchrl.generalized_advantage_estimate(
        0.99, 0.95, state_value.reshape(shape), next_state_value.reshape(shape),
        reward.reshape(shape), done,
    )


NAN_ADAPTERS = {
    "verl.compute_gae_advantage_return": (
        lambda token_level_rewards, values: verl.compute_gae_advantage_return(
            token_level_rewards, values, MASK, 1.0, 0.95),
        {"token_level_rewards": "rewards", "values": None},
    ),
    "verl.compute_policy_loss_vanilla": (
        _verl_policy,
        {"old_log_prob": "old_logp", "log_prob": "logp", "advantages": None,
         "rollout_is_weights": "is_weights"},
    ),
    "verl.compute_policy_loss": (
        _verl_policy_deprecated,
        {"old_log_prob": "old_logp", "log_prob": "logp", "advantages": None},
    ),
    "verl.agg_loss": (lambda loss_mat: verl.agg_loss(loss_mat, MASK, "token-mean"),
                      {"loss_mat": None}),
    "verl.compute_value_loss": (
        lambda vpreds, returns, values: verl.compute_value_loss(vpreds, returns, values, MASK, 0.2),
        # the case of the review: verl's values are our old_values, its vpreds our values
        {"vpreds": "values", "returns": None, "values": "old_values"},
    ),
    "openrlhf.get_advantages_and_returns": (
        lambda values, rewards: openrlhf.get_advantages_and_returns(
            values, rewards, MASK, 1.0, 0.95),
        {"values": None, "rewards": None},
    ),
    "openrlhf.PolicyLoss": (
        lambda log_probs, old_log_probs, advantages: openrlhf.PolicyLoss(dual_clip=3.0)(
            log_probs, old_log_probs, advantages, MASK),
        {"log_probs": "logp", "old_log_probs": "old_logp", "advantages": None},
    ),
    "openrlhf.ValueLoss": (
        lambda values, old_values, returns: openrlhf.ValueLoss(clip_eps=0.2)(
            values, old_values, returns, MASK),
        {"values": None, "old_values": None, "returns": None},
    ),
    "openrlhf.aggregate_loss": (lambda loss: openrlhf.aggregate_loss(loss, MASK),
                                {"loss": "loss_mat"}),
    "trl.compute_advantages_and_returns": (
        lambda values, rewards: trl.compute_advantages_and_returns(
            values, rewards, SEQ_LENS, 1.0, 0.95),
        {"values": None, "rewards": None},
    ),
    "trl.compute_advantages_and_returns(whiten_rewards)": (
        lambda values, rewards: trl.compute_advantages_and_returns(
            values, rewards, SEQ_LENS, 1.0, 0.95, whiten_rewards=True),
        {"values": None, "rewards": "x"},
    ),
    "trl.ppo_loss": (
        _trl_ppo,
        {"new_logprobs": "logp", "mb_logprobs": "old_logp", "mb_advantage": "advantages",
         "vpred": "values", "mb_values": "old_values", "mb_return": "returns"},
    ),
    "torchrl.generalized_advantage_estimate": (
        _torchrl,  # the scan's rewards are the TD errors, made of all three
        {"state_value": "rewards", "next_state_value": "rewards", "reward": "rewards"},
    ),
    "nemo.compute_gae": (
        lambda token_level_rewards, values: nemo.compute_gae(token_level_rewards, values, MASK),
        {"token_level_rewards": "rewards", "values": None},
    ),
}

NAN_CASES = [
    pytest.param(adapter, peer, ours, id=f"{adapter}-{peer}")
    for adapter, (_, names) in NAN_ADAPTERS.items()
    for peer, ours in names.items()
]


def word(name: str) -> str:
    return r"(?<![\w.])" + re.escape(name) + r"(?![\w])"


def names_peer_not_ours(message: str, peer: str, ours: str | None) -> None:
    assert re.search(word(peer), message), f"{peer!r} not named in: {message}"
    if ours is not None and ours != peer:
        assert not re.search(word(ours), message), f"our {ours!r} named in: {message}"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # verl's deprecated compute_policy_loss
@pytest.mark.parametrize("adapter, peer, ours", NAN_CASES)
def test_nan_names_the_peer_argument(adapter, peer, ours):
    call, names = NAN_ADAPTERS[adapter]
    with pytest.raises(ValueError, match="NaN") as raised:
        with_bad(call, list(names), peer)()
    names_peer_not_ours(str(raised.value), peer, ours)


# --------------------------------------------------------------------------------------
# A bad option or layout: (call, exception type, peer argument, our argument)

L = torch.randn(B, T, 5)
OOB = torch.full((B, T), 7)  # outside the vocabulary of 5
ONE_TOKEN = torch.zeros(B, T).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(1.0))
MASK_2 = MASK.long() * 2  # integer mask values other than 0 / 1 are weights, not a mask


def _verl_gae(rewards=None, mask=MASK, gamma=1.0, lam=1.0):
    rewards = data() if rewards is None else rewards
    return lambda: verl.compute_gae_advantage_return(rewards, data(), mask, gamma, lam)


def _verl_vanilla(config):
    return lambda: verl.compute_policy_loss_vanilla(
        data(), data(), data(), MASK, "token-mean", config)


def _openrlhf_gae(mask=MASK, lambd=0.95):
    return lambda: openrlhf.get_advantages_and_returns(data(), data(), mask, 1.0, lambd)


def _nemo(values=None, **config):
    values = data() if values is None else values
    return lambda: nemo.compute_gae(data(), values, MASK, **config)


def _trl_ppo_with(**changes):
    args = {"new_logprobs": data(), "mb_logprobs": data(), "mb_advantage": data(),
            "vpred": data(), "mb_values": data(), "mb_return": data(), "padding_mask": NO_PAD,
            "padding_mask_p1": NO_PAD, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1}
    return lambda: trl.ppo_loss(**{**args, **changes})


def _torchrl_with(gamma, lmbda):
    x = torch.randn(B, T, 1)
    return lambda: torchrl.generalized_advantage_estimate(
        gamma, lmbda, x, x, x, torch.zeros(B, T, 1, dtype=torch.bool))


OPTION_CASES = {
    # verl
    "verl.gae-lam": (_verl_gae(lam=1.5), ValueError, "lam", "lam_policy"),
    "verl.gae-lam-per-sequence": (_verl_gae(lam=torch.tensor([0.5, 1.5])), ValueError, "lam",
                                  "lam_policy"),
    "verl.gae-gamma-none": (_verl_gae(gamma=None), TypeError, "gamma", None),
    "verl.gae-one-token": (_verl_gae(mask=ONE_TOKEN), ValueError, "response_mask", "mask"),
    "verl.gae-mask-values": (_verl_gae(mask=MASK_2), ValueError, "response_mask", "mask"),
    "verl.gae-shape": (_verl_gae(rewards=data()[:, :3]), ValueError, "token_level_rewards",
                       "rewards"),
    "verl.policy-clip_ratio": (_verl_vanilla(verl_config(clip_ratio=-1.0)), ValueError,
                               "config.clip_ratio", "clip_low"),
    "verl.policy-clip_ratio-none": (_verl_vanilla(verl_config(clip_ratio=None)), ValueError,
                                    "config.clip_ratio", "clip_low"),
    "verl.policy-clip_ratio_high": (_verl_vanilla(verl_config(clip_ratio_high=-1.0)), ValueError,
                                    "config.clip_ratio_high", "clip_high"),
    "verl.policy-batch_num_tokens": (
        _verl_vanilla(verl_config(global_batch_info={"dp_size": 2, "batch_num_tokens": -1})),
        ValueError, "batch_num_tokens", "global_tokens"),
    "verl.policy-mask-shape": (
        lambda: verl.compute_policy_loss_vanilla(data(), data(), data(), MASK[:, :3], "token-mean",
                                                 verl_config()),
        ValueError, "response_mask", "mask"),
    "verl.deprecated-cliprange": (lambda: verl.compute_policy_loss(data(), data(), data(), MASK),
                                  ValueError, "cliprange", "clip_low"),
    "verl.agg_loss-global_batch_size": (
        lambda: verl.agg_loss(data(), MASK, "seq-mean-token-mean", dp_size=2, global_batch_size=-1),
        ValueError, "global_batch_size", "global_seqs"),
    "verl.agg_loss-mask-shape": (lambda: verl.agg_loss(data(), MASK[:, :3], "token-mean"),
                                 ValueError, "loss_mask", "mask"),
    "verl.value_loss-cliprange_value": (
        lambda: verl.compute_value_loss(data(), data(), data(), MASK, -1.0),
        ValueError, "cliprange_value", "value_clip"),
    "verl.value_loss-shape": (
        lambda: verl.compute_value_loss(data(), data(), data()[:, :3], MASK, 0.2),
        ValueError, "vpreds", "old_values"),
    "verl.logprobs_from_logits-labels": (lambda: verl.logprobs_from_logits(L, OOB), ValueError,
                                         "labels", "targets"),
    "verl.linear_cross_entropy-labels": (
        lambda: verl.linear_cross_entropy(
            torch.randn(B * T, 3), torch.randn(5, 3), OOB.reshape(-1)),
        ValueError, "labels", "targets"),
    # OpenRLHF
    "openrlhf.gae-lambd": (_openrlhf_gae(lambd=1.5), ValueError, "lambd", "lam_policy"),
    "openrlhf.gae-mask-values": (_openrlhf_gae(mask=MASK_2), ValueError, "action_mask", "mask"),
    "openrlhf.policy-clip_eps_low": (
        lambda: openrlhf.PolicyLoss(clip_eps_low=None)(data(), data(), data(), MASK),
        ValueError, "clip_eps_low", "clip_low"),
    "openrlhf.policy-clip_eps_high": (
        lambda: openrlhf.PolicyLoss(clip_eps_high=-1.0)(data(), data(), data(), MASK),
        ValueError, "clip_eps_high", "clip_high"),
    "openrlhf.policy-batch_num_tokens": (
        lambda: openrlhf.PolicyLoss()(data(), data(), data(), MASK, dp_size=2, batch_num_tokens=-1),
        ValueError, "batch_num_tokens", "global_tokens"),
    "openrlhf.policy-global_batch_size": (
        lambda: openrlhf.PolicyLoss(token_level_loss=False)(
            data(), data(), data(), MASK, dp_size=2, global_batch_size=-1),
        ValueError, "global_batch_size", "global_seqs"),
    "openrlhf.policy-mask-shape": (
        lambda: openrlhf.PolicyLoss()(data(), data(), data(), MASK[:, :3]),
        ValueError, "action_mask", "mask"),
    "openrlhf.value-clip_eps": (
        lambda: openrlhf.ValueLoss(clip_eps=-1.0)(data(), data(), data(), MASK),
        ValueError, "clip_eps", "value_clip"),
    "openrlhf.aggregate_loss-shape": (lambda: openrlhf.aggregate_loss(data(), MASK[:, :3]),
                                      ValueError, "loss_mask", "mask"),
    "openrlhf.log_probs_from_logits-labels": (lambda: openrlhf.log_probs_from_logits(L, OOB),
                                              ValueError, "labels", "targets"),
    # TRL
    "trl.gae-lam": (lambda: trl.compute_advantages_and_returns(data(), data(), SEQ_LENS, 1.0, -0.1),
                    ValueError, "lam", "lam_policy"),
    "trl.gae-one-token": (
        lambda: trl.compute_advantages_and_returns(data(), data(), torch.tensor([0, -1]), 1.0, 1.0),
        ValueError, "sequence_lengths", "mask"),
    "trl.gae-int-rewards-whitened": (
        lambda: trl.compute_advantages_and_returns(data(), data().long(), SEQ_LENS, 1.0, 1.0, True),
        TypeError, "rewards", "x"),
    "trl.ppo-cliprange": (_trl_ppo_with(cliprange=-1.0), ValueError, "cliprange", "clip_low"),
    "trl.ppo-cliprange_value": (_trl_ppo_with(cliprange_value=-1.0), ValueError,
                                "cliprange_value", "value_clip"),
    "trl.ppo-padding_mask": (_trl_ppo_with(padding_mask=NO_PAD[:, :3]), ValueError,
                             "padding_mask", "mask"),
    "trl.ppo-padding_mask_p1": (_trl_ppo_with(padding_mask_p1=NO_PAD[:, :3]), ValueError,
                                "padding_mask_p1", "mask"),
    "trl.ppo-vpred-shape": (_trl_ppo_with(vpred=data()[:, :3]), ValueError, "vpred", "values"),
    "trl.selective_log_softmax-index": (lambda: trl.selective_log_softmax(L, OOB), ValueError,
                                        "index", "targets"),
    # TorchRL: the scan sees only gamma * lmbda, so each is checked by name first
    "torchrl-lmbda": (_torchrl_with(0.5, 1.5), ValueError, "lmbda", "lam_policy"),
    "torchrl-lmbda-negative": (_torchrl_with(1.0, -1.0), ValueError, "lmbda", "lam_policy"),
    "torchrl-gamma": (_torchrl_with(1.5, 0.5), ValueError, "gamma", None),
    # NeMo-RL: each lambda under the GAEConfig field it came from
    "nemo-gae_lambda": (_nemo(gae_lambda=1.5), ValueError, "gae_lambda", "lam_policy"),
    "nemo-gae_lambda_value": (_nemo(gae_lambda_value=1.5), ValueError, "gae_lambda_value",
                              "lam_critic"),
    "nemo-gae_lambda_policy": (_nemo(gae_lambda_policy=1.5), ValueError, "gae_lambda_policy",
                               "lam_policy"),
    "nemo-gae_gamma": (_nemo(gae_gamma=1.5), ValueError, "gae_gamma", "gamma"),
    "nemo-gae_gamma-none": (_nemo(gae_gamma=None), TypeError, "gae_gamma", "gamma"),
    "nemo-length_adaptive_alpha": (_nemo(length_adaptive_alpha=float("inf")), ValueError,
                                   "length_adaptive_alpha", "alpha"),
    "nemo-shape": (_nemo(values=data()[:, :3]), ValueError, "token_level_rewards", "rewards"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option_names_the_peer_argument(case):
    call, exc, peer, ours = OPTION_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # verl's deprecated compute_policy_loss
        with pytest.raises(exc) as raised:
            call()
    assert type(raised.value) is exc
    names_peer_not_ours(str(raised.value), peer, ours)


def test_renaming_is_simultaneous_and_whole_word():
    """values -> vpreds and old_values -> values in one pass; mask inside another word
    (masked_whiten, response_mask) is left alone. The exception keeps its traceback."""
    def inner(**_):
        raise ValueError("old_values has shape (1,) but values has (2,); mask, masked_whiten")

    named = compat._peer_names(inner, values="vpreds", old_values="values", mask="response_mask")
    with pytest.raises(ValueError) as raised:
        named()
    assert str(raised.value) == (
        "values has shape (1,) but vpreds has (2,); response_mask, masked_whiten"
    )
    assert raised.traceback[-1].name == "inner"  # raised where it was, not re-made


# --------------------------------------------------------------------------------------
# normalize_advantages: OpenRLHF weights tokens by the mask; we count them, so refuse


@pytest.mark.parametrize("as_list", [False, True])
def test_normalize_advantages_refuses_a_fractional_mask(as_list):
    adv, mask = data(), torch.full((B, T), 0.5)
    args = ([adv, adv], [MASK.float(), mask]) if as_list else (adv, mask)
    with pytest.raises(ValueError, match=r"action_masks must hold only 0 and 1") as raised:
        openrlhf.normalize_advantages(*args)
    assert "0.5" in str(raised.value)
    with pytest.raises(ValueError, match=r"action_masks"):
        openrlhf.normalize_advantages(adv, MASK_2)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_normalize_advantages_binary_masks(dtype):
    adv = data()
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]]).to(dtype)
    valid = mask.bool()
    mean = adv[valid].mean()
    var = (adv[valid] - mean).square().mean()  # biased, as OpenRLHF
    torch.testing.assert_close(openrlhf.normalize_advantages(adv, mask), (adv - mean) / var.sqrt())


# --------------------------------------------------------------------------------------
# set_backend


@pytest.mark.parametrize("bad", ["cpu", "CPP", "", 1])
def test_set_backend_refuses_an_unknown_name(bad):
    from vapo_kernels._backends import BACKENDS

    before = compat.get_backend()
    with pytest.raises(ValueError, match=r"set_backend: name must be one of") as raised:
        compat.set_backend(bad)
    assert all(name in str(raised.value) for name in BACKENDS)
    assert compat.get_backend() == before


def test_set_backend_accepts_every_backend_and_none():
    from vapo_kernels._backends import BACKENDS

    try:
        for name in BACKENDS:
            compat.set_backend(name)
            assert compat.get_backend() == name
    finally:
        compat.set_backend(None)
    assert compat.get_backend() is None
