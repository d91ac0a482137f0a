"""Verifiable tasks: problems, demonstrations, a verifier, and step-level prefixes.

The built-in task is a **running sum modulo m** written step by step with a scratchpad:

    prompt    "357_____:"          the k digits, padded with "_" to ``max_steps`` slots
    response  "3>3 5>8 7>5 =5"    one step per digit: "<digit>><partial sum>", then "=<answer>"

The reward is sparse: 1 for an exact final answer, else 0. A chain of k steps is a
response of 4k + 2 tokens (+ EOS), so ``min_steps``/``max_steps`` mix short and long
chains in one batch. Padding the prompt to a fixed number of digit slots matters for a
tiny model: with variable-length prompts a 2-layer Llama did not learn the task from
scratch in minutes (docs: /work/shared/design/environment.md).

For the diagnostics built on top of the trainer, every task exposes its solution as a
list of **steps** (:meth:`RunningSumTask.steps`), a prefix of the response up to any step
(:meth:`response_prefix`, to be continued by the policy and scored with :meth:`score`),
and the same prefix with an **error injected** at a chosen step (``error_at=``): the
partial sum at that step is wrong and later steps carry the wrong sum forward, as a model
that slipped once and then computed correctly would write.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer; ``steps`` is the chain length (0 if unknown)."""

    prompt: str
    answer: str
    steps: int = 0
    data: tuple = field(default=(), compare=False)
    demonstration: str | None = None  # a reference response for supervised warm-up


class Task(Protocol):
    """What the trainer needs from a task."""

    name: str
    alphabet: str  # characters a built-in tokenizer must cover ("" when a model folder brings one)
    max_response_tokens: int
    has_demonstrations: bool  # demonstration() gives a response for some training problems

    def sample(self, rng: random.Random, count: int) -> list[Problem]: ...

    def heldout(self) -> list[Problem]: ...

    def demonstration(self, problem: Problem, rng: random.Random) -> str | None: ...

    def score(self, problem: Problem, response: str) -> float: ...


class RunningSumTask:
    """Running sum of k digits modulo ``modulus``, k uniform in [min_steps, max_steps]."""

    name = "running_sum"
    has_demonstrations = True

    def __init__(
        self,
        *,
        min_steps: int = 3,
        max_steps: int = 8,
        modulus: int = 10,
        slip_prob: float = 0.35,
        demo_errors: str = "random",
        heldout_size: int = 256,
        seed: int = 0,
    ) -> None:
        if not 2 <= modulus <= len(DIGITS):
            raise ValueError(f"modulus must be in [2, {len(DIGITS)}]")
        self.min_steps, self.max_steps, self.modulus = min_steps, max_steps, modulus
        self.slip_prob = slip_prob
        if demo_errors not in ("random", "systematic"):
            raise ValueError(f"demo_errors must be random or systematic, got {demo_errors!r}")
        self.demo_errors = demo_errors
        self.alphabet = DIGITS[:modulus] + "_:> ="
        self.max_response_tokens = 4 * max_steps + 3  # steps, "=", answer, EOS
        # The held-out set comes from its own seeded stream (disjoint from training draws
        # by construction of the seed, and checked in sample()).
        self._heldout = self.sample(random.Random(f"heldout-{seed}"), heldout_size)
        self._heldout_prompts = {p.prompt for p in self._heldout}
        # Training draws skip held-out prompts: with none left, sample() would never end.
        space = sum(modulus**k for k in range(min_steps, max_steps + 1))
        if len(self._heldout_prompts) >= space:
            raise ValueError(
                f"the held-out set ({heldout_size} draws) covers all {space} problems of this "
                f"task (modulus {modulus}, {min_steps}-{max_steps} steps), leaving none to "
                "train on: lower eval_size or allow more steps / a larger modulus"
            )

    def sample(self, rng: random.Random, count: int) -> list[Problem]:
        problems = []
        while len(problems) < count:
            k = rng.randint(self.min_steps, self.max_steps)
            digits = tuple(rng.randrange(self.modulus) for _ in range(k))
            problem = self.problem(digits)
            if problem.prompt not in getattr(self, "_heldout_prompts", ()):
                problems.append(problem)
        return problems

    def problem(self, digits: tuple[int, ...]) -> Problem:
        prompt = "".join(DIGITS[d] for d in digits).ljust(self.max_steps, "_") + ":"
        total = sum(digits) % self.modulus
        return Problem(prompt=prompt, answer=DIGITS[total], steps=len(digits), data=digits)

    def heldout(self) -> list[Problem]:
        return self._heldout

    # -- steps, prefixes and errors (the diagnostics' API) ---------------------------------
    def steps(self, problem: Problem, error_at: int | None = None, error_shift: int = 1) -> list[str]:
        """The solution's step strings; with ``error_at`` = j the partial sum of step j is
        off by ``error_shift`` (mod m) and later steps carry the wrong sum forward."""
        if error_at is not None and not 0 <= error_at < problem.steps:
            raise ValueError(f"error_at must be in [0, {problem.steps}), got {error_at}")
        if error_shift % self.modulus == 0:
            raise ValueError("error_shift must not be a multiple of the modulus")
        return self._steps(problem, {} if error_at is None else {error_at: error_shift})

    def _steps(self, problem: Problem, shifts: dict[int, int]) -> list[str]:
        """Step strings with the partial sum of step j off by ``shifts[j]``, carried forward."""
        partial, out = 0, []
        for j, digit in enumerate(problem.data):
            partial = (partial + digit + shifts.get(j, 0)) % self.modulus
            out.append(f"{DIGITS[digit]}>{DIGITS[partial]} ")
        return out

    def response_prefix(
        self, problem: Problem, num_steps: int, error_at: int | None = None, error_shift: int = 1
    ) -> str:
        """The response up to and including step ``num_steps`` (all steps: the full response)."""
        steps = self.steps(problem, error_at, error_shift)
        if num_steps >= len(steps):
            return "".join(steps) + "=" + steps[-1][2]
        return "".join(steps[:num_steps])

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """A worked response from an imperfect demonstrator.

        ``demo_errors="systematic"``: the demonstrator has a blind spot: at each step that
        adds the largest digit (m - 1) it adds m - 2 instead, with probability
        ``slip_prob`` (carried forward). With slip_prob > 0.5 the most likely
        demonstration is wrong there, so imitation learns the mistake and only the
        verifier's reward can correct it. ``"random"``: with probability ``slip_prob`` one
        slip at a random step by a random amount; the most likely demonstration stays
        correct, so imitation alone learns the task.
        """
        if self.demo_errors == "systematic":
            largest = self.modulus - 1
            shifts = {j: -1 for j, d in enumerate(problem.data)
                      if d == largest and rng.random() < self.slip_prob}
            steps = self._steps(problem, shifts)
            return "".join(steps) + "=" + steps[-1][2]
        if rng.random() < self.slip_prob:
            return self.response_prefix(
                problem,
                problem.steps,
                error_at=rng.randrange(problem.steps),
                error_shift=rng.randrange(1, self.modulus),
            )
        return self.response_prefix(problem, problem.steps)

    def score(self, problem: Problem, response: str) -> float:
        return float(final_answer(response) == problem.answer)


def final_answer(response: str) -> str | None:
    """What follows the last "=" (the answer line), stripped; None without one."""
    if "=" not in response:
        return None
    return response.rsplit("=", 1)[1].strip()


# -- jsonl tasks ----------------------------------------------------------------------------
def _last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return numbers[-1] if numbers else None


VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda response, answer: response.strip() == answer.strip(),
    "last_number": lambda response, answer: _last_number(response) == answer.strip(),
    "after_equals": lambda response, answer: final_answer(response) == answer.strip(),
    "contains": lambda response, answer: answer.strip() in response,
}


class JsonlTask:
    """Rows ``{"prompt": ..., "answer": ..., "response": optional demonstration}``.

    The last ``heldout_size`` rows are the held-out set; the verifier is chosen by name
    (:data:`VERIFIERS`).
    """

    alphabet = ""

    def __init__(self, path: str, *, verifier: str, heldout_size: int, max_response_tokens: int):
        self.name = f"jsonl:{path}"
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{i + 1}: not a JSON object ({error.msg})") from None
                if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                    raise ValueError(f"{path}:{i + 1}: each row needs 'prompt' and 'answer'")
                rows.append(row)
        problems = [
            Problem(str(r["prompt"]), str(r["answer"]), int(r.get("steps", 0)),
                    demonstration=r.get("response"))
            for r in rows
        ]
        if len(problems) <= heldout_size:
            raise ValueError(f"{path} has {len(problems)} rows, not more than eval_size={heldout_size}")
        self._train, self._heldout = problems[:-heldout_size], problems[-heldout_size:]
        # The warm-up draws training rows until it has a batch of demonstrations: none
        # among them would loop forever (the trainer refuses a warm-up then).
        self.has_demonstrations = any(p.demonstration is not None for p in self._train)
        self._verify = VERIFIERS[verifier]
        self.max_response_tokens = max_response_tokens

    def sample(self, rng: random.Random, count: int) -> list[Problem]:
        return [rng.choice(self._train) for _ in range(count)]

    def heldout(self) -> list[Problem]:
        return self._heldout

    def train_problems(self) -> list[Problem]:
        """The rows RL and the warm-up draw from (all but the held-out ones)."""
        return self._train

    def demonstration(self, problem: Problem, rng: random.Random) -> str | None:
        return problem.demonstration

    def score(self, problem: Problem, response: str) -> float:
        return float(self._verify(response, problem.answer))


class ReasoningGymTask:
    """A ``reasoning-gym`` dataset by name (optional extra): its questions, answers and scorer."""

    alphabet = ""
    has_demonstrations = False  # no reference responses: no supervised warm-up

    def __init__(self, name: str, *, heldout_size: int, max_response_tokens: int, seed: int):
        import reasoning_gym  # optional: pip install vapo-kernels[reasoning-gym]

        self.name = f"reasoning_gym:{name}"
        self._dataset = reasoning_gym.create_dataset(name, size=100_000, seed=seed)
        self._heldout = [self._problem(i) for i in range(heldout_size)]
        self._first_train_index = heldout_size
        self.max_response_tokens = max_response_tokens

    def _problem(self, index: int) -> Problem:
        entry = self._dataset[index]
        return Problem(entry["question"], str(entry["answer"]), data=(index,))

    def sample(self, rng: random.Random, count: int) -> list[Problem]:
        size = len(self._dataset)
        return [self._problem(rng.randrange(self._first_train_index, size)) for _ in range(count)]

    def heldout(self) -> list[Problem]:
        return self._heldout

    def demonstration(self, problem: Problem, rng: random.Random) -> str | None:
        return None

    def score(self, problem: Problem, response: str) -> float:
        entry = self._dataset[problem.data[0]]
        return float(self._dataset.score_answer(answer=response.strip(), entry=entry))
