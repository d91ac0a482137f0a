"""The compat adapters against the real peer packages (install with .ci/install_peers.sh).

Every comparison runs twice: with the default backend (C++ on CPU when it builds, else
the reference with a warning) and with ``backend="reference"`` (set through
``vapo_kernels.compat.set_backend``, since the peers' signatures have no backend slot).
Inputs are multi-turn: several masked gaps per row, rewards and garbage values on masked
tokens, all-masked rows and rows with a single valid token. fp32, abs + rel <= 1e-5.

How each peer is driven:

* verl 0.9.1: ``core_algos.compute_gae_advantage_return`` itself; ``patch()`` is checked
  through the body of verl's own ``ray_trainer.compute_advantage`` (its source is taken
  from the installed file and run against the real ``core_algos`` module; importing
  ``ray_trainer`` whole needs torchdata, peft, ...).
* OpenRLHF 0.11.2: the real ``RemoteExperienceMaker`` methods, from the real
  ``experience_maker.py``; the package ``__init__``s and heavy GPU-only imports
  (deepspeed, flash_attn, peft, vllm, the Ray launcher) are stubbed for the import only.
* TorchRL 0.14.1: ``torchrl.objectives.value.functional.generalized_advantage_estimate``.
* TRL 1.12.0: the GAE block is inline in ``PPOTrainer.train``; its lines (from
  "response_idxs = ..." to the final ``masked_fill`` of the advantages) and TRL's
  ``masked_whiten`` helpers are read from the installed ``ppo_trainer.py`` at test time
  and executed on our tensors. Nothing of TRL's code is stored in this repository.
* NeMo-RL is not installable (PyPI has a 0.0.0 placeholder), so its adapter is compared
  against a literal, straightforward Python loop written here from NeMo-RL's
  semantics (``GeneralizedAdvantageEstimator._compute_gae`` run once per lambda,
  ``_reward_whiten``, zero-fill), not against NeMo-RL's code.
"""

from __future__ import annotations

import ast
import random
import textwrap
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vapo_kernels import compat

from ._peers import trl_ppo_trainer_source, use_backend

pytestmark = pytest.mark.peers

BACKENDS = [None, "reference"]  # None: the default (automatic) choice
ATOL = RTOL = 1e-5
FAST = settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def close(ours, theirs, what=""):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------
# Multi-turn batches


def multi_turn_mask(batch: int, length: int, rng: random.Random) -> torch.Tensor:
    """0/1 float mask, one row kind per row: all masked, one valid token, or turns
    (valid runs separated by several masked gaps, maybe a masked prefix and padding)."""
    mask = torch.zeros(batch, length)
    for b in range(batch):
        kind = rng.random()
        if kind < 0.12:
            continue  # all masked
        if kind < 0.25:
            mask[b, rng.randrange(length)] = 1  # a single valid token
            continue
        t = rng.randrange(3) if rng.random() < 0.3 else 0
        end = length - (rng.randrange(length // 3 + 1) if rng.random() < 0.5 else 0)
        while t < end:
            run = rng.randint(1, 5)
            mask[b, t : min(t + run, end)] = 1
            t += run + rng.randint(1, 4)  # a tool/observation gap
    return mask


def multi_turn_batch(seed: int, batch: int, length: int, garbage: float = 1e4):
    """rewards, values, 0/1 float mask; masked slots hold large garbage."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    mask = multi_turn_mask(batch, length, rng)
    rewards = torch.randn(batch, length, generator=gen)
    values = torch.randn(batch, length, generator=gen)
    junk_r = (torch.rand(batch, length, generator=gen) - 0.5) * 2 * garbage
    junk_v = (torch.rand(batch, length, generator=gen) - 0.5) * 2 * garbage
    rewards = torch.where(mask.bool(), rewards, junk_r)
    values = torch.where(mask.bool(), values, junk_v)
    return rewards, values, mask


coefs = st.one_of(st.sampled_from([0.0, 0.5, 0.95, 1.0]), st.floats(0.0, 1.0))
shapes = st.tuples(st.integers(1, 6), st.integers(1, 24))


# --------------------------------------------------------------------------------------
# verl


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    gamma=coefs,
    lam=coefs,
    mask_dtype=st.sampled_from([torch.int64, torch.float32]),
    per_seq_lam=st.booleans(),
)
def test_verl_gae_matches(verl_core, backend, shape, seed, gamma, lam, mask_dtype, per_seq_lam):
    from vapo_kernels.compat.verl import compute_gae_advantage_return

    rewards, values, mask = multi_turn_batch(seed, *shape)
    mask = mask.to(mask_dtype)
    if per_seq_lam:  # verl broadcasts a (bs,) lam; VAPO's length-adaptive lambda is one
        lam = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed))
    args = (rewards, values, mask, gamma, lam)
    try:
        want = verl_core.compute_gae_advantage_return(*args)
    except ValueError:  # fewer than two valid tokens: verl's whitening refuses
        with use_backend(backend), pytest.raises(ValueError):
            compute_gae_advantage_return(*args)
        return
    with use_backend(backend):
        got = compute_gae_advantage_return(*args)
    close(got[0], want[0], "advantages")
    close(got[1], want[1], "returns")


@pytest.mark.parametrize("valid_tokens", [0, 1])
def test_verl_refuses_like_verl(verl_core, valid_tokens):
    from vapo_kernels.compat.verl import compute_gae_advantage_return

    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.int64)
    mask[1, 2:2 + valid_tokens] = 1
    with pytest.raises(ValueError):
        verl_core.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    with pytest.raises(ValueError):
        compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)


def verl_trainer_compute_advantage(core_algos):
    """verl's ``ray_trainer.compute_advantage``, built from the installed source and bound
    to the real ``core_algos`` module (the function the PPO trainers call)."""
    path = Path(core_algos.__file__).with_name("ray_trainer.py")
    source = path.read_text()
    node = next(
        n for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "compute_advantage"
    )
    namespace = {
        "core_algos": core_algos,
        "AdvantageEstimator": core_algos.AdvantageEstimator,
        "DataProto": object,
        "AlgoConfig": object,
        "Optional": typing.Optional,
        "compute_response_mask": None,  # not reached: the batch carries response_mask
    }
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102 - verl's code
    return namespace["compute_advantage"]


def test_verl_patch_swaps_and_restores(verl_core, monkeypatch):
    from vapo_kernels.compat import verl as adapter

    compute_advantage = verl_trainer_compute_advantage(verl_core)
    original_attr = verl_core.compute_gae_advantage_return
    original_reg = verl_core.get_adv_estimator_fn("gae")
    calls = []

    def counting_gae(*args, **kwargs):
        calls.append(1)
        return adapter_gae(*args, **kwargs)

    adapter_gae = adapter._gae  # vapo_kernels.gae under verl's argument names
    monkeypatch.setattr(adapter, "_gae", counting_gae)

    rewards, values, mask = multi_turn_batch(7, 4, 16, garbage=10.0)
    mask[0, :3] = 1  # at least two valid tokens

    def run_trainer():
        data = SimpleNamespace(
            batch={"token_level_rewards": rewards, "values": values, "response_mask": mask.long()}
        )
        out = compute_advantage(
            data, verl_core.AdvantageEstimator.GAE, gamma=0.99, lam=0.9, config={}
        )
        return out.batch["advantages"], out.batch["returns"]

    want = run_trainer()
    assert not calls
    try:
        adapter.patch()
        adapter.patch()  # idempotent
        assert adapter.is_patched()
        assert verl_core.compute_gae_advantage_return is adapter.compute_gae_advantage_return
        assert verl_core.get_adv_estimator_fn("gae") is adapter.compute_gae_advantage_return
        got = run_trainer()
        assert len(calls) == 1, "verl's trainer did not call the adapter"
        close(got[0], want[0], "advantages")
        close(got[1], want[1], "returns")
    finally:
        adapter.unpatch()
    adapter.unpatch()  # idempotent
    assert not adapter.is_patched()
    assert verl_core.compute_gae_advantage_return is original_attr
    assert verl_core.get_adv_estimator_fn("gae") is original_reg
    run_trainer()
    assert len(calls) == 1, "the adapter is still called after unpatch()"


# --------------------------------------------------------------------------------------
# OpenRLHF

@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    gamma=coefs,
    lambd=coefs,
    mask_kind=st.sampled_from(["bool", "float", "none"]),
)
def test_openrlhf_gae_matches(openrlhf_em, backend, shape, seed, gamma, lambd, mask_kind):
    from vapo_kernels.compat.openrlhf import get_advantages_and_returns

    rewards, values, mask = multi_turn_batch(seed, *shape)
    action_mask = {"bool": mask.bool(), "float": mask, "none": None}[mask_kind]
    if action_mask is None:  # no masking at all: keep the numbers moderate
        rewards, values = rewards.clamp(-3, 3), values.clamp(-3, 3)
    method = openrlhf_em.RemoteExperienceMaker.get_advantages_and_returns
    want = method(None, values, rewards, action_mask, gamma, lambd)  # ``self`` is unused
    with use_backend(backend):
        got = get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)
    close(got[0], want[0], "advantages")
    close(got[1], want[1], "returns")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("no_std_norm", [False, True])
def test_openrlhf_pipeline_with_normalisation(openrlhf_em, backend, no_std_norm):
    """OpenRLHF's own ``compute_advantages_and_returns`` (reward shaping with a KL
    penalty on every token, GAE per experience, normalisation over all experiences)
    against the adapter's GAE + normalize_advantages on the same shaped rewards."""
    from vapo_kernels.compat.openrlhf import get_advantages_and_returns, normalize_advantages

    gamma, lambd, kl_coef = 0.99, 0.95, 0.05
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=1),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(
                estimator="gae", gamma=gamma, lambd=lambd, no_std_norm=no_std_norm
            )
        ),
        reward=SimpleNamespace(clip_range=(-10.0, 10.0)),
    )
    real = openrlhf_em.RemoteExperienceMaker
    maker = SimpleNamespace(
        strategy=SimpleNamespace(args=args),
        advantage_estimator="gae",
        kl_ctl=SimpleNamespace(value=kl_coef),
    )
    maker.get_advantages_and_returns = lambda *a: real.get_advantages_and_returns(maker, *a)

    experiences, first = [], 0
    for seed, (batch, length) in enumerate([(3, 11), (2, 17), (4, 6)]):
        _, values, mask = multi_turn_batch(100 + seed, batch, length, garbage=50.0)
        mask[:, 0] = 1  # OpenRLHF puts the score on the last valid token of each row
        gen = torch.Generator().manual_seed(seed)
        experiences.append(
            SimpleNamespace(
                rewards=torch.randn(batch, generator=gen),
                kl=torch.randn(batch, length, generator=gen),  # also on masked tokens
                values=values,
                action_mask=mask.bool(),
                index=list(range(first, first + batch)),
                info={},
            )
        )
        first += batch
    inputs = [(e.values, e.kl.clone(), e.action_mask, e.rewards.clone()) for e in experiences]
    real.compute_advantages_and_returns(maker, experiences)

    with use_backend(backend):
        ours = []
        for values, kl, action_mask, score in inputs:
            shaped = openrlhf_em.compute_reward(
                score, kl_coef, kl, action_mask=action_mask, reward_clip_range=(-10.0, 10.0)
            )
            ours.append(get_advantages_and_returns(values, shaped, action_mask, gamma, lambd))
        normalised = normalize_advantages(
            [a for a, _ in ours], [m for _, _, m, _ in inputs], no_std_norm=no_std_norm
        )
    for exp, (_, returns), adv in zip(experiences, ours, normalised):
        close(adv, exp.advantages, "advantages")
        close(returns, exp.returns, "returns")


# --------------------------------------------------------------------------------------
# TorchRL


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    batch_dims=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    length=st.integers(1, 20),
    features=st.integers(1, 2),
    layout=st.sampled_from(["default", "time_first", "time_last", "1d", "1d_time0"]),
    p_done=st.sampled_from([0.0, 0.1, 0.4]),
    with_terminated=st.booleans(),
    gamma=coefs,
    lmbda=coefs,
    seed=st.integers(0, 2**31 - 1),
)
def test_torchrl_gae_matches(
    torchrl_gae, backend, batch_dims, length, features, layout, p_done, with_terminated,
    gamma, lmbda, seed,
):
    from vapo_kernels.compat.torchrl import generalized_advantage_estimate

    gen = torch.Generator().manual_seed(seed)
    if layout in ("1d", "1d_time0"):  # TorchRL adds a feature dim for time_dim=0
        shape, kwargs = (length,), {"time_dim": -1 if layout == "1d" else 0}
    elif layout == "time_first":  # [T, *B, F] with time_dim=0
        shape, kwargs = (length, *batch_dims, features), {"time_dim": 0}
    elif layout == "time_last":  # [*B, F, T] with time_dim=-1
        shape, kwargs = (*batch_dims, features, length), {"time_dim": -1}
    else:  # TorchRL's convention [*B, T, F], time_dim=-2 left to its default
        shape, kwargs = (*batch_dims, length, features), {}
    state_value, next_state_value, reward = (torch.randn(shape, generator=gen) for _ in range(3))
    done = torch.rand(shape, generator=gen) < p_done
    terminated = None
    if with_terminated:  # terminated implies done in TorchRL's envs; mix in a few extras
        terminated = (done & (torch.rand(shape, generator=gen) < 0.5)) | (
            torch.rand(shape, generator=gen) < 0.05
        )
    args = (gamma, lmbda, state_value, next_state_value, reward, done, terminated)
    try:
        want = torchrl_gae(*args, **kwargs)
    except (ValueError, RuntimeError) as e:  # e.g. a 1-element 1-D input
        with use_backend(backend), pytest.raises(type(e)):
            generalized_advantage_estimate(*args, **kwargs)
        return
    with use_backend(backend):
        got = generalized_advantage_estimate(*args, **kwargs)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    close(got[0], want[0], "advantage")
    close(got[1], want[1], "value_target")


def test_torchrl_shape_mismatch_raises_like_torchrl(torchrl_gae):
    from vapo_kernels.compat.torchrl import generalized_advantage_estimate

    v = torch.zeros(2, 5, 1)
    bad = (0.99, 0.95, v, v, torch.zeros(2, 4, 1), torch.zeros(2, 5, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError):
        torchrl_gae(*bad)
    with pytest.raises(RuntimeError):
        generalized_advantage_estimate(*bad)


# --------------------------------------------------------------------------------------
# TRL

_TRL_START = "response_idxs = torch.arange(responses.shape[1]"
_TRL_SPLIT = "# 5. whiten rewards"
_TRL_END = "advantages = torch.masked_fill(advantages, padding_mask, 0)"


@pytest.fixture(scope="module")
def trl_block():
    """TRL's own code, read from the installed ``ppo_trainer.py``: (helpers namespace,
    code up to the rewards, code from the reward whitening to the final advantages)."""
    path, source = trl_ppo_trainer_source()
    wanted = {"masked_mean", "masked_var", "masked_whiten", "INVALID_LOGPROB"}
    helpers = [
        n for n in ast.parse(source).body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in wanted for t in n.targets))
    ]
    namespace = {"torch": torch}
    exec(compile(ast.Module(helpers, []), str(path), "exec"), namespace)  # noqa: S102 - TRL's code
    lines = source.splitlines()
    start = next(i for i, s in enumerate(lines) if _TRL_START in s)
    split = next(i for i in range(start, len(lines)) if _TRL_SPLIT in lines[i])
    end = next(i for i in range(split, len(lines)) if _TRL_END in lines[i])
    part_a = compile(textwrap.dedent("\n".join(lines[start:split])), str(path), "exec")
    part_b = compile(textwrap.dedent("\n".join(lines[split : end + 1])), str(path), "exec")
    return namespace, part_a, part_b


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    gamma=coefs,
    lam=coefs,
    whiten_rewards=st.booleans(),
    kl_estimator=st.sampled_from(["k1", "k3"]),
    padding_rewards=st.booleans(),
)
def test_trl_gae_matches(
    trl_block, backend, shape, seed, gamma, lam, whiten_rewards, kl_estimator, padding_rewards
):
    from vapo_kernels.compat.trl import compute_advantages_and_returns

    helpers, part_a, part_b = trl_block
    batch, length = shape
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    # index of the last response token; -1 is an empty response, short rows are common
    sequence_lengths = torch.tensor(
        [rng.choice([-1, 0, length - 1] + [rng.randrange(length)] * 3) for _ in range(batch)]
    )
    values = torch.randn(batch, length, generator=gen)
    ns = dict(helpers)
    ns.update(
        args=SimpleNamespace(
            gamma=gamma, lam=lam, whiten_rewards=whiten_rewards,
            kl_estimator=kl_estimator, kl_coef=0.05,
        ),
        responses=torch.zeros(batch, length, dtype=torch.long),
        sequence_lengths=sequence_lengths,
        logprobs=-torch.rand(batch, length, generator=gen) * 3,
        ref_logprobs=-torch.rand(batch, length, generator=gen) * 3,
        values=values.clone(),
        scores=torch.randn(batch, generator=gen),
    )
    exec(part_a, ns)  # noqa: S102 - TRL's own lines, read from the installed file
    if padding_rewards:  # TRL's loop reads rewards past seq_len + 1 too; make them non-zero
        pad = torch.arange(length) > sequence_lengths[:, None] + 1
        ns["rewards"] = torch.where(pad, torch.randn(batch, length, generator=gen), ns["rewards"])
    rewards = ns["rewards"].clone()
    args = (values, rewards, sequence_lengths, gamma, lam, whiten_rewards)
    try:
        exec(part_b, ns)  # noqa: S102
    except ValueError:  # every response empty: TRL's whitening refuses
        with use_backend(backend), pytest.raises(ValueError):
            compute_advantages_and_returns(*args)
        return
    want = ns["advantages"], ns["returns"]
    if not (torch.isfinite(want[0]).all() and torch.isfinite(want[1]).all()):
        # one valid token in the batch: TRL divides by zero (NaN); the adapter refuses
        with use_backend(backend), pytest.raises(ValueError):
            compute_advantages_and_returns(*args)
        return
    with use_backend(backend):
        got = compute_advantages_and_returns(*args)
    close(got[0], want[0], "advantages")
    close(got[1], want[1], "returns")


# --------------------------------------------------------------------------------------
# NeMo-RL (not installable): a literal loop written from its semantics


def nemo_reference(rewards, values, mask, *, gae_lambda, gae_gamma, normalize_advantages,
                   gae_lambda_value, gae_lambda_policy, length_adaptive_alpha):
    """NeMo-RL's GeneralizedAdvantageEstimator after reward building, as plain loops."""

    def carry_loop(lam):  # the verl-style loop with float-mask carry, lam scalar or (B,)
        next_v = torch.zeros(values.shape[0])
        running = torch.zeros(values.shape[0])
        out = []
        for t in reversed(range(values.shape[1])):
            m = mask[:, t]
            delta = rewards[:, t] + gae_gamma * next_v - values[:, t]
            new = delta + gae_gamma * lam * running
            next_v = values[:, t] * m + (1 - m) * next_v
            running = new * m + (1 - m) * running
            out.append(running)
        adv = torch.stack(out[::-1], dim=1)
        return adv, adv + values

    lam_value = gae_lambda if gae_lambda_value is None else gae_lambda_value
    if length_adaptive_alpha > 0:
        lengths = mask.sum(dim=1).float()
        lam_policy = (1.0 - 1.0 / (length_adaptive_alpha * lengths).clamp(min=1.0)).clamp(0, 1)
    else:
        lam_policy = gae_lambda if gae_lambda_policy is None else gae_lambda_policy
    if gae_lambda_value is None and gae_lambda_policy is None and length_adaptive_alpha <= 0:
        advantages, returns = carry_loop(gae_lambda)
    else:  # decoupled: two passes
        _, returns = carry_loop(lam_value)
        advantages, _ = carry_loop(lam_policy)
    if normalize_advantages:
        n = mask.sum()
        mean = (advantages * mask).sum() / (n + 1e-8)
        var = ((advantages - mean) ** 2 * mask).sum() / (n + 1e-8) * (n / (n - 1))
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8)
    return advantages.masked_fill(~mask.bool(), 0), returns


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    gae_gamma=coefs,
    gae_lambda=coefs,
    gae_lambda_value=st.one_of(st.none(), coefs),
    gae_lambda_policy=st.one_of(st.none(), coefs),
    length_adaptive_alpha=st.sampled_from([0.0, 0.05, 0.5, 1.5]),
    normalize_advantages=st.booleans(),
)
def test_nemo_gae_matches_reference_loop(
    backend, shape, seed, gae_gamma, gae_lambda, gae_lambda_value, gae_lambda_policy,
    length_adaptive_alpha, normalize_advantages,
):
    from vapo_kernels.compat.nemo import compute_gae

    config = {
        "gae_gamma": gae_gamma,
        "gae_lambda": gae_lambda,
        "gae_lambda_value": gae_lambda_value,
        "gae_lambda_policy": gae_lambda_policy,
        "length_adaptive_alpha": length_adaptive_alpha,
        "normalize_advantages": normalize_advantages,
    }

    rewards, values, mask = multi_turn_batch(seed, *shape, garbage=100.0)
    if config["normalize_advantages"] and mask.sum() < 2:
        # NeMo-RL's whitening divides by n - 1 (NaN for one token; the adapter raises)
        if mask.numel() < 2:
            config["normalize_advantages"] = False
        else:
            mask.view(-1)[:2] = 1
    want = nemo_reference(rewards, values, mask, **config)
    with use_backend(backend):
        got = compute_gae(rewards, values, mask, **config)
    close(got[0], want[0], "advantages")
    close(got[1], want[1], "returns")


def test_nemo_all_masked_batch_is_zero():
    from vapo_kernels.compat.nemo import compute_gae

    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.zeros(2, 4)
    adv, returns = compute_gae(rewards, values, mask, length_adaptive_alpha=0.05)
    assert torch.equal(adv, torch.zeros(2, 4))
    close(returns, values)  # nothing to carry: A = 0, returns = V


@FAST
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), kl_coef=st.sampled_from([0.0, 0.1]))
def test_nemo_token_level_rewards(shape, seed, kl_coef):
    from vapo_kernels.compat.nemo import build_token_level_rewards

    _, _, mask = multi_turn_batch(seed, *shape)
    gen = torch.Generator().manual_seed(seed)
    scores, kl = torch.randn(shape[0], generator=gen), torch.randn(*shape, generator=gen)
    want = torch.zeros(shape) - (kl_coef * kl if kl_coef > 0 else 0)
    for b in range(shape[0]):  # the score goes on the last valid token of the row
        valid = torch.nonzero(mask[b]).reshape(-1)
        if valid.numel():
            want[b, valid[-1]] += scores[b]
    want = want * mask
    close(build_token_level_rewards(scores, mask, kl, kl_coef), want)


# --------------------------------------------------------------------------------------
# Output dtypes: a drop-in returns what the peer returns (bf16 critic, fp32 rewards)


def test_output_dtypes_match_peers(verl_core, openrlhf_em, torchrl_gae, trl_block):
    from vapo_kernels.compat import openrlhf as c_openrlhf
    from vapo_kernels.compat import torchrl as c_torchrl
    from vapo_kernels.compat import trl as c_trl
    from vapo_kernels.compat import verl as c_verl

    rewards, values, mask = multi_turn_batch(3, 4, 9, garbage=5.0)
    mask[:, :2] = 1
    values = values.bfloat16()
    pairs = [
        (c_verl.compute_gae_advantage_return(rewards, values, mask.long(), 1.0, 0.95),
         verl_core.compute_gae_advantage_return(rewards, values, mask.long(), 1.0, 0.95)),
        (c_openrlhf.get_advantages_and_returns(values, rewards, mask.bool(), 1.0, 0.95),
         openrlhf_em.RemoteExperienceMaker.get_advantages_and_returns(
             None, values, rewards, mask.bool(), 1.0, 0.95)),
        (c_torchrl.generalized_advantage_estimate(
            0.99, 0.95, values[..., None], values[..., None].float(), rewards[..., None],
            mask[..., None] == 0),
         torchrl_gae(0.99, 0.95, values[..., None], values[..., None].float(),
                     rewards[..., None], mask[..., None] == 0)),
    ]
    for ours, theirs in pairs:
        assert [t.dtype for t in ours] == [t.dtype for t in theirs]
        assert [t.shape for t in ours] == [t.shape for t in theirs]
    helpers, part_a, part_b = trl_block
    lengths = torch.tensor([8, 3, 5, 0])
    ns = dict(helpers)
    ns.update(
        args=SimpleNamespace(gamma=1.0, lam=0.95, whiten_rewards=False, kl_estimator="k1",
                             kl_coef=0.0),
        responses=torch.zeros(4, 9, dtype=torch.long), sequence_lengths=lengths,
        logprobs=torch.zeros(4, 9), ref_logprobs=torch.zeros(4, 9), values=values,
        scores=torch.ones(4),
    )
    exec(part_a, ns)  # noqa: S102 - TRL's own lines
    exec(part_b, ns)  # noqa: S102
    ours = c_trl.compute_advantages_and_returns(values, ns["rewards"], lengths, 1.0, 0.95)
    assert [t.dtype for t in ours] == [ns["advantages"].dtype, ns["returns"].dtype]
