"""Monte-Carlo credit beside GAE: the injected-errors Monte-Carlo row with scripted,
deterministic policies whose continuations are known, so the credit is known exactly."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.diagnose.common import start_run, trainer_config
from vapo_kernels.diagnose.injected_errors import mc_label, measure_stage
from vapo_kernels.train.task import DIGITS


class ScriptedPolicy(torch.nn.Module):
    """A deterministic running-sum "policy" with ``generate``: it finishes the chain of a
    prompt + partial response. ``carry``: each new step adds to the last written partial
    sum (an earlier error is carried to a wrong answer); otherwise it writes the true
    partial sums whatever the prefix says (it recovers from any error)."""

    def __init__(self, tokenizer, modulus: int, carry: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for rollout.generate
        self.tokenizer, self.modulus, self.carry = tokenizer, modulus, carry

    def finish(self, text: str) -> str:
        prompt, written = text.split(":", 1)
        digits = [DIGITS.index(c) for c in prompt if c != "_"]
        steps = written.split()
        partial = sum(digits[: len(steps)]) % self.modulus
        if self.carry and steps:
            partial = DIGITS.index(steps[-1][-1])
        out = ""
        for d in digits[len(steps):]:
            partial = (partial + d) % self.modulus
            out += f"{DIGITS[d]}>{DIGITS[partial]} "
        return out + "=" + DIGITS[partial]

    generation_config = None  # rollout.generate swaps in a blank one while sampling

    def generate(self, input_ids, attention_mask, generation_config, **_):
        max_new_tokens = generation_config.max_new_tokens
        pad_token_id, eos_token_id = generation_config.pad_token_id, generation_config.eos_token_id
        tok = self.tokenizer
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            new = tok(self.finish(text), add_special_tokens=False).input_ids + [eos_token_id]
            rows.append(ids + new[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny warmed-up run (chains of 3 steps) shared by the tests of this module."""
    threads = torch.get_num_threads()
    config = trainer_config("tiny", 0, str(tmp_path_factory.mktemp("run")),
                            ["--min_steps", "3", "--max_steps", "3"], progress=False)
    run = start_run(config)
    run.log.close()
    torch.set_num_threads(threads)
    return run


def _mc_row(run, carry: bool) -> dict:
    run.state.policy = ScriptedPolicy(run.state.tokenizer, run.task.modulus, carry)
    stage = measure_stage(run, 3, 4, 0, False, mc_samples=2, mc_problems=3)
    return stage["lambdas"][mc_label(2)]


def test_scripted_policy_finishes_chains(tiny_run):
    task = tiny_run.task
    problem = task.problem((3, 5, 7))
    carry = ScriptedPolicy(tiny_run.state.tokenizer, task.modulus, carry=True)
    recover = ScriptedPolicy(tiny_run.state.tokenizer, task.modulus, carry=False)
    wrong_prefix = task.response_prefix(problem, 2, error_at=1)        # "3>3 5>9 "
    assert problem.prompt + carry.finish(problem.prompt) == problem.prompt + task.response_prefix(problem, 3)
    assert task.score(problem, wrong_prefix + carry.finish(problem.prompt + wrong_prefix)) == 0.0
    assert task.score(problem, wrong_prefix + recover.finish(problem.prompt + wrong_prefix)) == 1.0


def test_mc_puts_all_blame_on_the_error_when_the_policy_cannot_recover(tiny_run):
    row = _mc_row(tiny_run, carry=True)
    # V = 1 on every correct prefix, 0 from the wrong step on: only step k has A = -1.
    assert row["mass_at_k"] == [1.0, 1.0, 1.0]
    assert row["mass_before_k"] == row["mass_after_k"] == [0.0, 0.0, 0.0]
    assert row["credit_map"] == [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]


def test_mc_blames_the_answer_when_the_policy_always_recovers(tiny_run):
    row = _mc_row(tiny_run, carry=False)
    # Every prefix is worth 1 under a policy that recovers; the written wrong answer (the
    # last segment, after every step) takes all the blame.
    assert row["mass_at_k"] == [0.0, 0.0, 0.0]
    assert row["mass_after_k"] == [1.0, 1.0, 1.0]
    assert all(v == 0.0 for r in row["credit_map"] for v in r)


def test_short_vs_long_scores_every_setting_on_the_step_advantage(tiny_run):
    """A policy that always writes the right chain: every prefix is worth 1, so every true
    step advantage is 0; Monte-Carlo estimates it exactly. GAE on the untrained critic
    (V = 0) with lambda 1 estimates a step's advantage as its lambda-return minus V before
    it, R - 0 = 1 per step (the same quantity as Monte-Carlo's, not the sum of the step's
    per-token advantages, which was the token count 4); the reference critic (the truth's
    own values, 1 everywhere) scores 0."""
    from vapo_kernels.diagnose.short_vs_long import advantage_errors, settings

    run = tiny_run
    run.state.policy = ScriptedPolicy(run.state.tokenizer, run.task.modulus, carry=True)
    problems = [run.task.problem((3, 5, 7)), run.task.problem((9, 9, 1))]
    options = settings([1.0], [], mc_samples=2)
    assert list(options) == ["lambda 1", "Monte-Carlo K=2"]
    errors = advantage_errors(run, problems, 2, options)
    assert errors["position"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert errors["truth"] == [0.0] * 8
    assert errors["errors"]["Monte-Carlo K=2"] == [0.0] * 8
    assert errors["errors"]["lambda 1"] == pytest.approx([1.0] * 8, abs=1e-6)
    assert errors["errors"]["lambda 1 [reference critic]"] == pytest.approx([0.0] * 8, abs=1e-6)


# -- the estimators on a known cliff, with a hand-made critic whose V varies by position ----
class CliffPolicy(ScriptedPolicy):
    """From the bare prompt it writes the chain with the partial sum of step ``cliff`` off
    by one (carried on, so the answer is wrong); from any non-empty prefix it carries on
    (a correct prefix is finished correctly). True prefix values of its own response are
    therefore 0 (empty), 1 (correct steps before the cliff), 0 (from the cliff on)."""

    def __init__(self, tokenizer, modulus: int, cliff: int):
        super().__init__(tokenizer, modulus, carry=True)
        self.cliff = cliff

    def finish(self, text: str) -> str:
        prompt, written = text.split(":", 1)
        if written:
            return super().finish(text)
        digits = [DIGITS.index(c) for c in prompt if c != "_"]
        partial, out = 0, ""
        for j, d in enumerate(digits):
            partial = (partial + d + (1 if j == self.cliff else 0)) % self.modulus
            out += f"{DIGITS[d]}>{DIGITS[partial]} "
        return out + "=" + DIGITS[partial]


class HandCritic(torch.nn.Module):
    """V(state) = 1 if every complete step written so far is right, else 0, plus 0.01 per
    response token so far: a critic that varies by position, with known values."""

    def __init__(self, tokenizer, modulus: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.modulus = tokenizer, modulus

    def value(self, ids: list[int]) -> float:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if ":" not in text:  # inside the prompt: not a state of the response
            return 0.0
        prompt, written = text.split(":", 1)
        digits = [DIGITS.index(c) for c in prompt if c != "_"]
        right, partial = 1.0, 0
        for j, step in enumerate(written.split("=", 1)[0].split(" ")[:-1]):  # complete steps
            partial = (partial + digits[j]) % self.modulus if j < len(digits) else partial
            if j >= len(digits) or step != f"{DIGITS[digits[j]]}>{DIGITS[partial]}":
                right = 0.0
        prompt_tokens = len(self.tokenizer(prompt + ":", add_special_tokens=False).input_ids)
        return right + 0.01 * (len(ids) - prompt_tokens)

    def forward(self, input_ids, attention_mask=None, **_):
        rows = input_ids.tolist()
        out = torch.tensor([[self.value(r[: c + 1]) for c in range(len(r))] for r in rows])
        return type("Out", (), {"logits": out[..., None]})()


@pytest.fixture
def cliff_run(tiny_run, monkeypatch):
    """tiny_run with the cliff policy (error at step 1) and the hand-made critic."""
    run = tiny_run
    monkeypatch.setattr(run.state, "policy", CliffPolicy(run.state.tokenizer, run.task.modulus, 1))
    monkeypatch.setattr(run.state, "value_model", HandCritic(run.state.tokenizer, run.task.modulus))
    return run


def test_hand_made_critic_and_cliff_policy(cliff_run):
    tok, task = cliff_run.state.tokenizer, cliff_run.task
    problem = task.problem((3, 5, 7))
    policy, critic = cliff_run.state.policy, cliff_run.state.value_model
    assert policy.finish(problem.prompt) == task.response_prefix(problem, 3, error_at=1)  # 3>3 5>9 7>6 =6
    ids = tok(problem.prompt + "3>3 5>9 ", add_special_tokens=False).input_ids
    assert critic.value(ids[:-4]) == pytest.approx(1.04) and critic.value(ids) == pytest.approx(0.08)


def test_value_probe_reads_v_at_each_boundary_and_offsets_from_the_cliff(cliff_run):
    from vapo_kernels.diagnose.value_probe import probe_boundaries

    probe = probe_boundaries(cliff_run, [cliff_run.task.problem((3, 5, 7))], samples=2)
    # "3>3 5>9 7>6 =6": boundaries before tokens 0, 4, 8, 12; the cliff is step 1.
    assert probe["position"] == [0, 1, 2, 3]
    assert probe["value"] == pytest.approx([1.0, 1.04, 0.08, 0.12])  # V(s_t) at t = 0, 4, 8, 12
    assert probe["cliff_offset"] == [-2, -1, 0, 1]  # 0: the boundary right after the wrong step
    assert probe["mc_value"] == [0.0, 1.0, 0.0, 0.0]


def test_rank_alternatives_takes_v_after_each_alternative(cliff_run, monkeypatch):
    import random

    from vapo_kernels.diagnose.value_probe import rank_alternatives

    monkeypatch.setattr(cliff_run.state, "policy",
                        ScriptedPolicy(cliff_run.state.tokenizer, cliff_run.task.modulus, carry=True))
    problems = [cliff_run.task.problem((3, 5, 7)), cliff_run.task.problem((9, 9, 1))]
    ranked = rank_alternatives(cliff_run, problems, samples=2, alternatives=3, rng=random.Random(0))
    for vs, ms in zip(ranked["value"], ranked["mc_value"]):
        n = len(vs)
        assert n == 3 and ms == [1.0, 0.0, 0.0]  # the correct step first, then wrong sums
        tokens = round(100 * (vs[0] - 1.0))  # V after the prefix: 1 + 0.01 * its tokens
        assert tokens % 4 == 0 and tokens >= 4
        assert vs == pytest.approx([1.0 + tokens / 100, tokens / 100, tokens / 100])
    assert ranked["top1_agreement"] == 1.0 and ranked["groups_with_unique_best"] == 2


def _gae_by_hand(rewards, values, lam, gamma=1.0):
    """Per-token GAE advantages of one sequence, the textbook recursion."""
    n, adv, out = len(values), 0.0, [0.0] * len(values)
    for t in reversed(range(n)):
        nxt = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * nxt - values[t]
        adv = delta + gamma * lam * adv
        out[t] = adv
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
def test_short_vs_long_step_estimate_at_several_lambdas(lam):
    from vapo_kernels.diagnose.short_vs_long import step_estimates

    values = [0.2, 0.5, 0.4, 0.7, 0.6, 0.9]
    rewards = [0.0] * 5 + [1.0]
    segments = [(0, 0, 0, 3), (0, 1, 3, 6)]
    got = step_estimates(torch.tensor(rewards), torch.tensor(values),
                         torch.tensor([0, 6], dtype=torch.int32), segments, lam, 1.0)
    a = _gae_by_hand(rewards, values, lam)
    # TD errors over the step (telescoping to V(after) - V(before)) + lambda * A(after)
    assert got[0] == pytest.approx(values[3] - values[0] + lam * a[3], abs=1e-6)
    assert got[1] == pytest.approx(1.0 - values[3], abs=1e-6)  # the last step: R - V(before)
    assert got[0] == pytest.approx(0.5 + lam * (-0.1 + 0.3 * lam + 0.1 * lam ** 2), abs=1e-6)


def test_short_vs_long_errors_on_a_known_cliff_at_two_lambdas(cliff_run):
    from vapo_kernels.diagnose.short_vs_long import advantage_errors, settings

    options = settings([0.0, 1.0], [], mc_samples=2)
    errors = advantage_errors(cliff_run, [cliff_run.task.problem((3, 5, 7))], 2, options)
    # "3>3 5>9 7>6 =6": true values 0, 1, 0, 0 at the boundaries, reward 0.
    assert errors["position"] == [0, 1, 2, 3]
    assert errors["truth"] == [1.0, -1.0, 0.0, 0.0]
    e = errors["errors"]
    assert e["Monte-Carlo K=2"] == [0.0] * 4  # a deterministic policy: Monte-Carlo is exact
    # lambda 0: V(after) - V(before) of the hand-made critic (V = 1.00, 1.04, 0.08, 0.12, R = 0)
    assert e["lambda 0"] == pytest.approx([0.04 - 1, -0.96 + 1, 0.04, -0.12], abs=1e-6)
    # lambda 1: R - V(before)
    assert e["lambda 1"] == pytest.approx([-1.0 - 1, -1.04 + 1, -0.08, -0.12], abs=1e-6)
    assert e["lambda 0 [reference critic]"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert e["lambda 1 [reference critic]"] == pytest.approx([-1.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_injected_errors_gae_rows_on_the_monte_carlo_chains(tiny_run, monkeypatch):
    """4 chains per k, Monte-Carlo on the first 3: the GAE rows are measured on those 3 as
    well (the same per-chain masses as the first 3 of the all-chains rows) and the verdict
    compares rows on the same chains, with a bootstrap interval."""
    from vapo_kernels.diagnose.injected_errors import lambda_settings, same_chains_label

    monkeypatch.setattr(tiny_run.state, "value_model",
                        HandCritic(tiny_run.state.tokenizer, tiny_run.task.modulus))
    monkeypatch.setattr(tiny_run.state, "policy",
                        ScriptedPolicy(tiny_run.state.tokenizer, tiny_run.task.modulus, True))
    stage = measure_stage(tiny_run, 3, 4, 0, False, mc_samples=2, mc_problems=3)
    rows = stage["lambdas"]
    for label in lambda_settings(tiny_run.config.algorithm.alpha):
        sub = rows[same_chains_label(label, 3)]["mass_at_k_per_chain"]
        full = rows[label]["mass_at_k_per_chain"]
        assert [len(c) for c in sub] == [3, 3, 3] and [len(c) for c in full] == [4, 4, 4]
        assert sub == [c[:3] for c in full]
    # The hand-made critic knows the wrong step (V drops from 1 to 0 across it): lambda 0
    # puts nearly all the negative mass there (the rest: R - V at the end, 0 - 0.01 * 15),
    # lambda 1 spreads it over every token up to the error.
    assert all(m > 0.8 for m in rows["lambda 0 (TD)"]["mass_at_k"])
    assert all(a < b for a, b in zip(rows["lambda 1.0"]["mass_at_k"], rows["lambda 0 (TD)"]["mass_at_k"]))
    assert rows[mc_label(2)]["mass_at_k"] == [1.0, 1.0, 1.0]
    boot = stage["bootstrap"]
    assert set(boot["mc_minus_gae_ci"]) == {same_chains_label(k, 3) for k in
                                            lambda_settings(tiny_run.config.algorithm.alpha)}
    lo, hi = boot["mass_at_k_mean_ci"][mc_label(2)]
    assert lo == hi == 1.0  # every chain puts all the blame on k: no spread to resample


def test_injected_errors_verdict_follows_the_bootstrap_interval():
    from vapo_kernels.diagnose.injected_errors import bootstrap_stage, mc_comparison

    def stage(mc_chains, gae_chains):
        rows = {"lambda 0 (TD)": gae_chains, mc_label(2): mc_chains}
        data = {k: {"mass_at_k": [sum(c) / len(c) for c in v], "mass_at_k_per_chain": v}
                for k, v in rows.items()}
        out = {"name": "s", "lambdas": data, "uniform_share_of_step_k": [0.1, 0.1]}
        out["bootstrap"] = bootstrap_stage(out, mc_label(2), len(mc_chains[0]), (0, 0))
        return out

    results = {"mc_samples": 2, "length": 2, "mc_problems": 16}
    clear = stage([[0.5] * 16, [0.6] * 15 + [0.4]], [[0.1] * 16, [0.2] * 16])
    noisy = stage([[0.0, 1.0] * 8, [1.0, 0.0] * 8], [[0.4] * 16, [0.5] * 16])
    sentence = mc_comparison({**results, "stages": [clear]})
    assert "more sharply than" in sentence and "95% CI" in sentence
    assert "not distinguishable" in mc_comparison({**results, "stages": [noisy]})
    # A 6-point gap (over the old fixed 5-point margin) within chain noise is not a verdict.
    lo, hi = noisy["bootstrap"]["mc_minus_gae_ci"]["lambda 0 (TD)"]
    assert lo < 0.05 < hi
    # Seeded: the same intervals again.
    assert stage([[0.0, 1.0] * 8, [1.0, 0.0] * 8], [[0.4] * 16, [0.5] * 16])["bootstrap"] == noisy["bootstrap"]


# -- a special token drawn mid-response: step boundaries on the ids as sampled ----------------
class PadPolicy(CliffPolicy):
    """CliffPolicy (error at step 1) that, from the bare prompt, also draws a PAD as its
    third token: "3>" PAD "3 5>9 7>6 =6" EOS. decode(skip_special_tokens=True) drops it
    from the text, so re-tokenising the text puts every later boundary one token early."""

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        out = super().generate(input_ids, attention_mask, generation_config, **kwargs)
        pad = generation_config.pad_token_id
        rows = []
        for ids, full, mask in zip(input_ids.tolist(), out.tolist(), attention_mask.tolist()):
            text = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            new = full[len(ids):]
            if text.endswith(":"):  # a fresh response
                new = new[:2] + [pad] + new[2:]
            rows.append(ids + new)
        width = max(map(len, rows))
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


@pytest.fixture
def pad_run(cliff_run, monkeypatch):
    monkeypatch.setattr(cliff_run.state, "policy",
                        PadPolicy(cliff_run.state.tokenizer, cliff_run.task.modulus, 1))
    return cliff_run


def test_char_offsets_map_onto_the_sampled_ids(tiny_run):
    from vapo_kernels.train.mc_advantage import char_offsets_to_tokens

    tok = tiny_run.state.tokenizer
    ids = tok("3>3 5>9 ", add_special_tokens=False).input_ids
    ids = ids[:2] + [tok.pad_token_id] + ids[2:] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "3>3 5>9 "
    assert char_offsets_to_tokens(tok, ids, [0, 4, 8]) == [0, 5, 9]  # text re-tokenised: 0, 4, 8
    plain = tok("3>3 5>9 ", add_special_tokens=False).input_ids
    assert char_offsets_to_tokens(tok, plain, [0, 4, 8]) == [0, 4, 8]


def test_value_probe_boundaries_after_a_pad_drawn_mid_response(pad_run):
    from vapo_kernels.diagnose.value_probe import probe_boundaries

    probe = probe_boundaries(pad_run, [pad_run.task.problem((3, 5, 7))], samples=2)
    # ids "3 > PAD 3 _ 5 > 9 _ 7 > 6 _ = 6 EOS": boundaries before tokens 0, 5, 9, 13
    assert probe["value"] == pytest.approx([1.0, 1.05, 0.09, 0.13])
    assert probe["cliff_offset"] == [-2, -1, 0, 1]
    assert probe["mc_value"] == [0.0, 1.0, 0.0, 0.0]


def test_short_vs_long_segments_after_a_pad_drawn_mid_response(pad_run):
    from vapo_kernels.diagnose.short_vs_long import advantage_errors, settings

    errors = advantage_errors(pad_run, [pad_run.task.problem((3, 5, 7))], 2,
                              settings([0.0], [], mc_samples=2))
    assert errors["truth"] == [1.0, -1.0, 0.0, 0.0]
    # V(after) - V(before) on the ids as sampled: V = 1.00, 1.05, 0.09, 0.13 at 0, 5, 9, 13
    assert errors["errors"]["lambda 0"] == pytest.approx([0.05 - 1, -0.96 + 1, 0.04, -0.13], abs=1e-6)
    assert errors["errors"]["lambda 0 [reference critic]"] == pytest.approx([0.0] * 4, abs=1e-6)


def test_diagnostics_continue_from_the_sampled_ids(pad_run, monkeypatch):
    """value-probe's and short-vs-long's Monte-Carlo continuations (and the Monte-Carlo
    setting's) start from the response's ids as sampled, the PAD included: the state whose
    V they read, not its text re-tokenised (which loses the PAD)."""
    from vapo_kernels.diagnose.short_vs_long import advantage_errors, settings
    from vapo_kernels.diagnose.value_probe import probe_boundaries

    task, tok, policy = pad_run.task, pad_run.state.tokenizer, pad_run.state.policy
    problem = task.problem((3, 5, 7))
    good = tok(task.response_prefix(problem, 3, error_at=1), add_special_tokens=False).input_ids
    sampled = good[:2] + [tok.pad_token_id] + good[2:] + [tok.eos_token_id]
    prompt = tok(problem.prompt, add_special_tokens=False).input_ids
    seen, generate = [], policy.generate

    def recording(input_ids, attention_mask, generation_config, **kwargs):
        seen.extend(tuple(i for i, m in zip(ids, mask) if m)
                    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()))
        return generate(input_ids, attention_mask, generation_config, **kwargs)

    monkeypatch.setattr(policy, "generate", recording)
    expected = {tuple(prompt + sampled[:cut]) for cut in (0, 5, 9, 13)}
    probe_boundaries(pad_run, [problem], samples=2)
    assert set(seen) == expected
    seen.clear()
    advantage_errors(pad_run, [problem], 2, settings([0.0], [], mc_samples=2))
    assert set(seen) == expected and len(seen) > len(expected)


def test_mc_advantages_after_a_pad_drawn_mid_response():
    """A PAD the policy drew inside step 0 stays in the response ids but not in the decoded
    text: step boundaries found by re-tokenising the text put step 1's blame one token
    early (review's pad_misalign.py). Response "3>3 5>9 7>6 =6", wrong partial sum at step
    1 of a policy that carries errors: the -1 belongs on step 1's tokens, 5..8 here."""
    from vapo_kernels.train.mc_advantage import mc_advantages
    from vapo_kernels.train.models import build_char_tokenizer
    from vapo_kernels.train.rollout import build_batch
    from vapo_kernels.train.task import RunningSumTask

    task = RunningSumTask(min_steps=3, max_steps=3, modulus=10, heldout_size=4, seed=0)
    tok = build_char_tokenizer(task.alphabet)
    problem = task.problem((3, 5, 7))
    good = tok(task.response_prefix(problem, 3, error_at=1), add_special_tokens=False).input_ids
    ids = good[:2] + [tok.pad_token_id] + good[2:] + [tok.eos_token_id]
    batch = build_batch(tok, [problem], [ids], task)
    adv, _ = mc_advantages(ScriptedPolicy(tok, task.modulus, carry=True), tok, task, batch,
                           samples=1, max_response_tokens=task.max_response_tokens,
                           temperature=1.0)
    assert [t for t, a in enumerate(adv.tolist()) if a < 0] == [5, 6, 7, 8]
