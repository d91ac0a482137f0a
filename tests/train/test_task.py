"""The built-in task: verifier, steps, prefixes and error injection (the diagnostics' API)."""

import json
import random

import pytest

from vapo_kernels.train.task import JsonlTask, RunningSumTask, final_answer


def test_running_sum_solution_scores_one_and_slips_score_zero():
    task = RunningSumTask(min_steps=3, max_steps=6, heldout_size=8)
    rng = random.Random(0)
    for problem in task.sample(rng, 50):
        full = task.response_prefix(problem, problem.steps)
        assert task.score(problem, full) == 1.0
        assert final_answer(full) == problem.answer
        for step in range(problem.steps):
            wrong = task.response_prefix(problem, problem.steps, error_at=step, error_shift=3)
            assert task.score(problem, wrong) == 0.0  # the error is carried to the answer
        assert task.score(problem, full + "1") == 0.0  # exact match only


def test_prompt_is_padded_to_fixed_slots_and_steps_match_the_length():
    task = RunningSumTask(min_steps=2, max_steps=5, heldout_size=4)
    problem = task.problem((3, 5, 7))
    assert problem.prompt == "357__:" and problem.answer == "5" and problem.steps == 3
    assert task.steps(problem) == ["3>3 ", "5>8 ", "7>5 "]
    assert task.response_prefix(problem, 3) == "3>3 5>8 7>5 =5"


def test_prefix_and_error_injection_at_a_chosen_step():
    task = RunningSumTask(min_steps=2, max_steps=5, heldout_size=4)
    problem = task.problem((3, 5, 7))
    assert task.response_prefix(problem, 1) == "3>3 "
    # step 1 off by 2: 8 -> 0, and step 2 continues from the wrong sum: 0 + 7 = 7
    assert task.steps(problem, error_at=1, error_shift=2) == ["3>3 ", "5>0 ", "7>7 "]
    assert task.response_prefix(problem, 2, error_at=1, error_shift=2) == "3>3 5>0 "
    with pytest.raises(ValueError, match="error_at"):
        task.steps(problem, error_at=3)


def test_mixed_lengths_heldout_disjoint_and_modulus():
    task = RunningSumTask(min_steps=2, max_steps=7, modulus=7, heldout_size=64, seed=1)
    train = task.sample(random.Random(5), 400)
    assert {p.steps for p in train} == set(range(2, 8))
    assert not {p.prompt for p in train} & {p.prompt for p in task.heldout()}
    assert all(int(p.answer) < 7 for p in train)


def test_systematic_demonstrator_adds_the_largest_digit_as_one_less():
    task = RunningSumTask(slip_prob=0.7, demo_errors="systematic", heldout_size=4)
    rng = random.Random(0)
    without_nine = task.problem((3, 5, 7))
    assert all(task.demonstration(without_nine, rng) == "3>3 5>8 7>5 =5" for _ in range(20))
    with_nine = task.problem((3, 9, 2))
    demos = [task.demonstration(with_nine, rng) for _ in range(400)]
    wrong = demos.count("3>3 9>1 2>3 =3")  # 3 + 8 = 1, carried forward
    assert wrong + demos.count("3>3 9>2 2>4 =4") == 400
    assert 240 < wrong < 320  # the most likely demonstration is the wrong one


def test_random_demonstrations_slip_at_the_configured_rate():
    task = RunningSumTask(slip_prob=0.5, demo_errors="random", heldout_size=4)
    rng = random.Random(0)
    problems = task.sample(rng, 400)
    wrong = sum(task.score(p, task.demonstration(p, rng)) == 0 for p in problems)
    assert 150 < wrong < 250


def test_jsonl_task_verifiers_and_heldout_split(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "response": f"{i + 1}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = JsonlTask(str(path), verifier="last_number", heldout_size=3, max_response_tokens=8)
    assert [p.prompt for p in task.heldout()] == ["7+1=", "8+1=", "9+1="]
    problem = task.heldout()[0]
    assert task.score(problem, "so it is 8") == 1.0 and task.score(problem, "9") == 0.0
    assert task.demonstration(problem, random.Random(0)) == "8"
