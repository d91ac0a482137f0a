"""ablations: one value pretraining per seed and setting serves every row that has that
setting, with exactly the numbers the row gets when it pretrains itself."""

from __future__ import annotations

import pytest
import torch

from vapo_kernels.diagnose.ablations import ROWS, row_config, run_row, shared_value_pretraining
from vapo_kernels.diagnose.common import continue_run, pretrain_value, start_run, with_options
from vapo_kernels.train.metrics import read_rows

# Everything a metrics row holds except how long it took.
TIMING = ("elapsed_s", "since_warmup_s", "time_", "peak_")


def _options(tmp_path):
    return {"preset": "tiny", "output_dir": str(tmp_path), "progress": False}


def _rl_rows(config):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)}
            for row in read_rows(f"{config.run.output_dir}/metrics.jsonl")]


def test_rows_that_pretrain_alike_are_grouped(tmp_path):
    configs = {name: row_config(_options(tmp_path), 0, name, []) for _, name, _ in ROWS}
    assert shared_value_pretraining(configs) == {
        "none": ["none", "no_length_adaptive", "no_clip_higher", "no_lm_loss"],
        "no_decoupled_gae": ["no_decoupled_gae"],  # the critic's targets use lambda_policy
        "no_token_level": ["no_token_level"],  # the value loss's aggregation
        "no_group_sampling": ["no_group_sampling"],  # the batch's prompts
    }  # no_value_pretrain and vanilla_ppo have none
    # A trainer option the grouping does not know about keeps settings apart.
    other = with_options(configs["none"], critic_lr=5e-4)
    assert shared_value_pretraining({"none": configs["none"], "other": other}) == {
        "none": ["none"], "other": ["other"]}


def test_a_row_continued_from_shared_value_pretraining_matches_its_own(tmp_path):
    options = _options(tmp_path)
    # Short chains and a brisk warm-up: the policy solves some (rewards, hence non-zero
    # value losses, critic gradients and AdamW moments, in value pretraining and RL).
    extra = ["--value_pretrain_steps", "2", "--min_steps", "1", "--max_steps", "2",
             "--warmup_steps", "40", "--warmup_lr", "1e-2"]
    base_config = row_config(options, 0, "none", extra, out_dir=str(tmp_path / "warmup"))
    base = start_run(base_config)
    base.log.close()
    pre = continue_run(base, row_config(options, 0, "none", extra, out_dir=str(tmp_path / "pre")))
    pretrain_value(pre)
    pre.log.close()
    assert all(row["vf_loss"] > 0 for row in read_rows(pre.log.path))
    critic = [p.detach().clone() for p in pre.state.value_model.parameters()]
    for name in ("no_clip_higher", "no_length_adaptive", "no_lm_loss", "none"):
        own = row_config(options, 0, name, extra, out_dir=str(tmp_path / f"{name}_own"))
        shared = row_config(options, 0, name, extra, out_dir=str(tmp_path / f"{name}_shared"))
        a = run_row(base, own, 2)
        b = run_row(pre, shared, 2, value_pretrained=True)
        assert a["curve"] == b["curve"]
        rows_a = [r for r in _rl_rows(own) if r["phase"] == "rl"]
        assert len(rows_a) == 3 and rows_a[1]["vf_loss"] > 0 and "pg_loss" in rows_a[1]
        assert rows_a == _rl_rows(shared), name  # losses, grad norms, rewards, accuracies
    # The rows trained copies: the shared pretrained critic is as it was.
    assert all(torch.equal(p, q) for p, q in zip(critic, pre.state.value_model.parameters()))
    # A row whose value pretraining differs cannot continue from it.
    with pytest.raises(ValueError, match="same value-pretraining options"):
        continue_run(pre, row_config(options, 0, "no_decoupled_gae", extra,
                                     out_dir=str(tmp_path / "bad")), value_pretrained=True)


def _null_results(rng, accuracies, seeds=2, eval_size=128):
    import statistics

    rows = []
    for (row, name, paper), p in zip(ROWS, accuracies):
        finals = [sum(rng.random() < p for _ in range(eval_size)) / eval_size for _ in range(seeds)]
        rows.append({"row": row, "ablation": name, "paper_aime24": paper, "final_accuracy": finals,
                     "final_accuracy_mean": statistics.mean(finals),
                     "final_accuracy_sd": statistics.stdev(finals) if seeds > 1 else None})
    return rows


def test_verdict_makes_few_false_calls_under_the_null():
    """Nine rows of the same true accuracy, each seed's final accuracy only binomial
    held-out noise (2 seeds x 128 problems, the quick preset): the old margin (the larger
    sd at 1 sigma) called 1.8 of 8 rows hurt/helped on average; the 2-se verdict ~0.1."""
    import random

    from vapo_kernels.diagnose.ablations import compare_to_full

    rng = random.Random(0)
    calls = [sum(c["call"] != "same" for c in compare_to_full(_null_results(rng, [0.45] * 9), 128))
             for _ in range(300)]
    assert sum(calls) / len(calls) < 0.3  # expected false calls per study (of 8 rows)
    assert sum(c > 0 for c in calls) / len(calls) < 0.2


def test_verdict_calls_a_clear_difference_and_renders():
    import random

    from vapo_kernels.diagnose.ablations import compare_to_full, report

    rows = _null_results(random.Random(1), [0.45, 0.10] + [0.45] * 6 + [0.80], seeds=3)
    verdict = {c["row"]: c["call"] for c in compare_to_full(rows, 128)}
    assert verdict["w/o value pretraining"] == "hurt" and verdict["vanilla PPO"] == "helped"
    assert list(verdict.values()).count("same") >= 5
    one_seed = _null_results(random.Random(2), [0.45] * 9, seeds=1)  # sd None: binomial only
    assert all(c["se"] > 0 for c in compare_to_full(one_seed, 128))
    results = {"rows": [{**r, "steps_to_threshold": [None] * len(r["final_accuracy"]),
                         "value_pretrain_s_mean": 0, "wall_s_mean": 0} for r in rows],
               "seeds": [0, 1, 2], "rl_steps": 8, "post_warmup_accuracy_mean": 0.4,
               "threshold_rule": "x", "eval_noise": 0.5 / 128 ** 0.5,
               "spearman": {"rho": 0.0, "p_value": 1.0}}  # no eval_size: older results
    line = next(l for l in report(results) if l.startswith("Against full VAPO"))
    assert "hurt in 1 row(s): w/o value pretraining" in line and "helped in 1: vanilla PPO" in line
    assert "8 rows are tested at once" in line and "Bonferroni's correction for 8 tests (2.73 se)" in line


def test_rows_always_include_full_vapo_and_names_may_have_spaces():
    from vapo_kernels.diagnose.ablations import selected_rows
    from vapo_kernels.train.config import ConfigError

    names = lambda text: [name for _, name, _ in selected_rows(text)]  # noqa: E731
    assert names("vanilla_ppo") == ["none", "vanilla_ppo"]  # full VAPO first: the reference
    assert names(" vanilla_ppo ,  no_lm_loss") == ["none", "no_lm_loss", "vanilla_ppo"]
    assert names("") == [name for _, name, _ in ROWS]
    with pytest.raises(ConfigError, match="--rows"):
        selected_rows("none,no_such_row")


def test_bonferroni_and_row_counts_follow_the_rows_run():
    import random
    from statistics import NormalDist

    from vapo_kernels.diagnose.ablations import bonferroni_z, report

    assert bonferroni_z(8) == pytest.approx(2.734, abs=1e-3)  # the old constant 2.73
    assert bonferroni_z(2) == pytest.approx(2.241, abs=1e-3)
    # family-wise 5%: two-sided tail of each test times the tests
    assert 2 * (1 - NormalDist().cdf(bonferroni_z(5))) * 5 == pytest.approx(0.05)
    rows = [{**r, "steps_to_threshold": [None], "value_pretrain_s_mean": 0, "wall_s_mean": 0}
            for r in _null_results(random.Random(1), [0.45, 0.10, 0.80], seeds=1)]
    results = {"rows": [rows[0], rows[1], rows[-1]], "seeds": [0], "rl_steps": 8,
               "post_warmup_accuracy_mean": 0.4, "threshold_rule": "x", "eval_size": 128,
               "spearman": {"rho": 0.5, "p_value": 0.67}}
    text = "\n".join(report(results))
    assert "rho = 0.50 (p = 0.67, 3 rows)" in text
    assert "2 rows are tested at once" in text and "for 2 tests (2.24 se)" in text
    only_full = "\n".join(report({**results, "rows": [rows[0]], "spearman": {"rho": None}}))
    assert "needs at least 3 rows, got 1" in only_full and "Only full VAPO ran" in only_full
