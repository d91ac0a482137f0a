"""The VAPO loop (arXiv 2504.05118, Algorithm box / §5), composed from vapo_kernels' public ops.

    warm-up        supervised steps on the task's demonstrations         (positive_lm via vapo_loss)
    value pretrain rollouts of the warmed-up policy, critic on Monte-Carlo returns
    for each RL step:
        rollout    prompts x group_size samples (transformers generate, KV cache)
        rewards    the task's verifier on each response: sparse, on the last token
        values     old log-probs, old values (and reference log-probs) under no_grad
        GAE        vk.decoupled_gae: lambda_critic for value targets, length-adaptive
                   lambda_policy for advantages, one call on the packed batch
        PPO        epochs x mini-batches; per micro-batch one vk.vapo_loss call with the
                   policy (Clip-Higher, token-level), clipped value, positive-example LM
                   and optional KL / entropy terms; then both optimizers step

All mutable training state lives in :class:`TrainState` (a later checkpoint/resume saves
and restores exactly that object).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

import vapo_kernels as vk

from .config import TrainConfig
from .distributed import DataParallel
from .metrics import MetricsLogger, PhaseTimer, our_op, peak_memory_mb
from .models import dropout_off
from .mc_advantage import trainer_advantages
from .rollout import RolloutBatch, demonstration_batch, generate, policy_logprobs, value_estimates
from .task import Task


@dataclass
class TrainState:
    """Everything the loop mutates, in one place (for checkpoint/resume)."""

    policy: torch.nn.Module
    tokenizer: Any
    value_model: torch.nn.Module | None = None
    reference: torch.nn.Module | None = None
    actor_optimizer: torch.optim.Optimizer | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    actor_scheduler: Any = None
    critic_scheduler: Any = None
    task_rng: random.Random = field(default_factory=random.Random)
    shuffle_generator: torch.Generator = field(default_factory=torch.Generator)
    warmup_optimizer: torch.optim.Optimizer | None = None
    phase: str = "warmup"
    step: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    post_warmup_eval: dict[str, float] = field(default_factory=dict)
    bad_steps: int = 0  # consecutive steps whose update was skipped (non-finite)
    warmup_end_time: float | None = None
    # Not saved: how this process runs (data-parallel place, checkpoint writer).
    dp: DataParallel = field(default_factory=DataParallel)
    checkpointer: Any = None
    # The rollout engine: called like rollout.generate (None: that function, transformers
    # generate on the policy); a vllm_engine.VllmEngine holds no state a checkpoint needs.
    engine: Any = None


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def after_step(state: TrainState, config: TrainConfig, bad: str | None, log: MetricsLogger,
               *, last: bool = False) -> None:
    """Count non-finite steps (stop after max_bad_steps in a row) and checkpoint when due.

    A step whose update was skipped is never checkpointed, so the latest checkpoint is the
    last good one."""
    if bad is not None:
        state.bad_steps += 1
        limit = config.optim.max_bad_steps
        log.write(f"[vapo-train] warning: {state.phase} step {state.step}: non-finite {bad}; "
                  f"update skipped ({state.bad_steps} in a row, the run stops at {limit})")
        if state.bad_steps >= limit:
            kept = state.checkpointer.last_saved if state.checkpointer is not None else None
            raise TrainingStopped(
                f"stopped at {state.phase} step {state.step}: {limit} steps in a row had a "
                f"non-finite loss or gradient (last: {bad}); last good checkpoint: "
                f"{kept or 'none (--save_every 0)'}")
        return
    state.bad_steps = 0
    saver = state.checkpointer
    if saver is not None and saver.enabled and (last or saver.due(state.step)):
        saver.save(state)


# -- small helpers ------------------------------------------------------------------------------
def max_new_tokens(config: TrainConfig, task: Task) -> int:
    return config.task.max_new_tokens or task.max_response_tokens


def uses_packed_forward(config: TrainConfig) -> bool:
    """flash-attn varlen takes one packed row; every other attention gets a padded batch."""
    return config.model.attn_implementation == "flash_attention_2"


def constant_after_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (VAPO §5)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1))
    )


def sample_problems(state: TrainState, task: Task, config: TrainConfig) -> list:
    """prompts_per_step prompts, each repeated samples_per_prompt times (group sampling)."""
    prompts = task.sample(state.task_rng, config.prompts_per_step)
    prompts = state.dp.shard(prompts)  # every process draws all; each keeps its share
    return [p for p in prompts for _ in range(config.samples_per_prompt)]


@torch.no_grad()
def evaluate(state: TrainState, task: Task, config: TrainConfig) -> dict[str, float]:
    """Greedy held-out accuracy (overall, and on the shorter / longer half of chain lengths)."""
    problems = task.heldout()
    batch = sample(state, problems, task, config, greedy=True)
    out = {"heldout_accuracy": batch.scores.mean().item(),
           "heldout_response_length": batch.response_lengths.float().mean().item()}
    steps = torch.tensor([p.steps for p in problems])
    if steps.max() > steps.min():
        middle = (steps.min() + steps.max()) / 2
        out["heldout_accuracy_short"] = batch.scores[steps <= middle].mean().item()
        out["heldout_accuracy_long"] = batch.scores[steps > middle].mean().item()
    # Every process evaluates the same held-out set, but its numbers could still differ
    # (GPU non-determinism): rank 0's are the ones logged and the ones every process acts
    # on (the warm-up stops at a target accuracy: one process stopping alone would leave
    # the others waiting in a collective).
    return state.dp.from_main(out)


def nonfinite(values: dict[str, Any]) -> str | None:
    """The name of the first non-finite number in ``values`` (None when all are finite)."""
    for key, value in values.items():
        if value is None:
            continue
        number = float(value.detach() if isinstance(value, Tensor) else value)
        if not math.isfinite(number):
            return f"{key} ({number})"
    return None


def _grad_norm(model, grad_clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, already the global norm
        norm = norm.full_tensor()
    return float(norm)


def guarded_update(state: TrainState, updates: list[tuple[str, Any, Any, Any]],
                   grad_clip: float, bad: str | None) -> tuple[list[float], str | None]:
    """Clip and step each ``(name, model, optimizer, scheduler)`` unless the loss (``bad``)
    or a gradient norm is non-finite on any process: then no model steps (nor its
    scheduler) and the gradients are dropped. Returns the norms and what was non-finite."""
    norms = [_grad_norm(model, grad_clip) for _, model, _, _ in updates]
    bad = bad or nonfinite({f"{name}_grad_norm": n for (name, *_), n in zip(updates, norms)})
    if state.dp.distributed:
        if state.dp.all_reduce([bad is not None], op="max")[0] and bad is None:
            bad = "loss or gradient on another process"
    for _, model, optimizer, scheduler in updates:
        if bad is None:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return norms, bad


# -- supervised warm-up (and the supervised baseline) ------------------------------------------
def warmup_optimizer(state: TrainState, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(state.policy.parameters(), lr=config.warmup.warmup_lr,
                             weight_decay=config.optim.weight_decay)


def supervised_loss(policy, batch: RolloutBatch, config: TrainConfig,
                    dp: DataParallel | None = None) -> tuple[Tensor, dict]:
    """Mean NLL of the demonstrations: VAPO's positive-example LM term with every sequence
    positive and weight 1, so even the warm-up's loss comes from vk.vapo_loss. With several
    processes the mean is over all their tokens (global count, ``dp_size``)."""
    logp, _ = policy_logprobs(policy, batch, temperature=1.0,
                              logprobs_from=config.model.logprobs_from,
                              packed=uses_packed_forward(config))
    positive = torch.ones(batch.size, dtype=torch.bool, device=logp.device)
    dp = dp or DataParallel()
    tokens = dp.all_reduce([batch.num_tokens])[0] if dp.distributed else None
    with our_op("vapo_loss"):
        return vk.vapo_loss(logp, None, None, None, batch.cu_seqlens.to(logp.device),
                            positive=positive, lm_coef=1.0, global_positive_tokens=tokens,
                            dp_size=dp.world_size)


def supervised(
    state: TrainState,
    task: Task,
    config: TrainConfig,
    log: MetricsLogger,
    *,
    phase: str,
    max_steps: int,
    stop_accuracy: float | None,
    max_seconds: float = math.inf,
    resume: bool = False,
) -> dict[str, float]:
    """Supervised steps on demonstrations until ``max_steps``, the target held-out accuracy,
    or ``max_seconds``; returns the last evaluation. ``resume``: continue after the step
    restored from a checkpoint (``state.warmup_optimizer`` restored with it)."""
    w = config.warmup
    if state.warmup_optimizer is None:
        state.warmup_optimizer = warmup_optimizer(state, config)
    optimizer = state.warmup_optimizer
    start = time.perf_counter()
    log.start_phase(phase, max_steps if math.isinf(max_seconds) else None)
    if resume:
        first, last_eval = state.step + 1, state.last_eval
        log.advance(state.step)
    else:
        state.phase, state.step, first = phase, 0, 1
        last_eval = state.last_eval = evaluate(state, task, config)
        since = {} if state.warmup_end_time is None else {
            "since_warmup_s": round(time.perf_counter() - state.warmup_end_time, 3)}
        log.log(phase, 0, **last_eval, **since)
        if state.warmup_end_time is None:  # the baseline phase is not checkpointed
            after_step(state, config, None, log)
    for step in range(first, max_steps + 1):
        state.step = step
        # warmup_batch_size is the global batch, as prompts_per_step: every process draws
        # the same demonstrations and keeps its share (the CLI checked that they split)
        batch = demonstration_batch(state.tokenizer, task, state.task_rng, w.warmup_batch_size)
        if state.dp.distributed:
            batch = batch.select(torch.tensor(state.dp.shard(list(range(batch.size)),
                                                             "warmup_batch_size")))
        loss, _ = supervised_loss(state.policy, batch, config, state.dp)
        loss.backward()
        _, bad = guarded_update(state, [("actor", state.policy, optimizer, None)],
                                config.optim.grad_clip, nonfinite({"lm_loss": loss}))
        log.advance()
        row: dict[str, Any] = state.dp.reduce_row({"lm_loss": loss.item()})
        done = time.perf_counter() - start >= max_seconds or step == max_steps
        if step % w.warmup_eval_every == 0 or done:
            last_eval = state.last_eval = evaluate(state, task, config)
            row.update(last_eval)
        if state.warmup_end_time is not None:
            row["since_warmup_s"] = round(time.perf_counter() - state.warmup_end_time, 3)
        log.log(phase, step, **row)
        if done or (stop_accuracy is not None and "heldout_accuracy" in row
                    and row["heldout_accuracy"] >= stop_accuracy):
            break  # the next phase's start is checkpointed, not this step
        if state.warmup_end_time is None:
            after_step(state, config, bad, log)
    log.close_bar()
    return last_eval


# -- the RL pieces -------------------------------------------------------------------------------
def compute_advantages(batch: RolloutBatch, values: Tensor, config: TrainConfig,
                       dp: DataParallel | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(advantages, value_targets, lambda_policy per sequence)`` from one vk.decoupled_gae call.

    Each switch maps onto the op's arguments: length-adaptive (VAPO) derives
    lambda_policy = 1 - 1/(alpha l) per sequence; not decoupled gives the critic the policy's
    lambda too.
    """
    with our_op("decoupled_gae"):
        return _advantages(batch, values, config, dp)


def _advantages(batch: RolloutBatch, values: Tensor, config: TrainConfig,
                dp: DataParallel | None) -> tuple[Tensor, Tensor, Tensor]:
    a = config.algorithm
    lengths = batch.response_lengths
    if a.length_adaptive:
        lam_policy = vk.length_adaptive_lambda(lengths, a.alpha)
    else:
        lam_policy = torch.full((batch.size,), a.lam_policy, dtype=torch.float64)
    lam_critic = a.lam_critic if a.decoupled_gae else lam_policy
    device = values.device
    advantages, targets = vk.decoupled_gae(
        batch.rewards.to(device), values, None, batch.cu_seqlens.to(device),
        gamma=a.gamma, lam_critic=_on(lam_critic, device), lam_policy=_on(lam_policy, device),
        whiten=a.whiten_advantages and not (dp and dp.distributed),
    )
    if a.whiten_advantages and dp and dp.distributed:  # statistics over every process's tokens
        advantages = vk.masked_whiten(advantages, process_group=dp.group)
    return advantages, targets, lam_policy


def _on(lam: float | Tensor, device) -> float | Tensor:
    return lam.to(device) if isinstance(lam, Tensor) else lam


@dataclass
class OldOutputs:
    """Per-token data fixed for the PPO epochs of one step (packed (N,) tensors)."""

    logp: Tensor
    values: Tensor
    advantages: Tensor
    targets: Tensor
    ref_logp: Tensor | None

    def select(self, tokens: Tensor) -> OldOutputs:
        pick = lambda t: None if t is None else t[tokens.to(t.device)]  # noqa: E731
        return OldOutputs(*(pick(getattr(self, f)) for f in
                            ("logp", "values", "advantages", "targets", "ref_logp")))


@dataclass
class GlobalCounts:
    """Token/sequence counts of a whole mini-batch, so the loss of each micro-batch is its
    exact share of the mini-batch loss (gradient accumulation without rescaling)."""

    tokens: float
    seqs: float
    positive_tokens: float

    dp_size: int = 1

    @classmethod
    def of(cls, batch: RolloutBatch, dp: DataParallel | None = None) -> GlobalCounts:
        """The counts over every process's share of the mini-batch (one all-reduce)."""
        dp = dp or DataParallel()
        lengths = batch.response_lengths
        local = (lengths.sum(), (lengths > 0).sum(), lengths[batch.scores > 0].sum())
        return cls(*dp.all_reduce(local), dp_size=dp.world_size)


def micro_batch_loss(
    state: TrainState, micro: RolloutBatch, old: OldOutputs, counts: GlobalCounts,
    config: TrainConfig, timer: PhaseTimer | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of both models and one vk.vapo_loss call with every VAPO term."""
    a, r = config.algorithm, config.rollout
    timer = timer or PhaseTimer()
    with timer("loss_forward"):
        packed = uses_packed_forward(config)
        logp, entropy = policy_logprobs(state.policy, micro, temperature=r.temperature,
                                        logprobs_from=config.model.logprobs_from, packed=packed)
        values = value_estimates(state.value_model, micro, packed=packed) if a.vf_coef > 0 else None
        device = logp.device
        with our_op("vapo_loss"):
            loss, metrics = _vapo_loss(logp, old, micro, values, entropy, counts, a, r, device)
    return loss, metrics


def _vapo_loss(logp, old, micro, values, entropy, counts, a, r, device):
    """The one vk.vapo_loss call of a micro-batch, every VAPO term switched by the config."""
    correction = {} if r.rollout_is == "none" else dict(
        rollout_logp=micro.rollout_logp.to(device), rollout_is=r.rollout_is,
        rollout_is_mode=r.rollout_is_mode, rollout_is_threshold=r.rollout_is_threshold)
    return vk.vapo_loss(
        logp, old.logp, old.advantages, None, micro.cu_seqlens.to(device),
        values=values,
        old_values=old.values if values is not None else None,
        returns=old.targets if values is not None else None,
        ref_logp=old.ref_logp,
        # The entropy is always reported; it carries gradient only with a bonus.
        entropy=entropy if a.entropy_coef > 0 else entropy.detach(),
        positive=(micro.scores > 0).to(device) if a.lm_coef > 0 else None,
        clip_low=a.clip_low, clip_high=a.clip_high,
        dual_clip=a.dual_clip or None,
        value_clip=a.value_clip or None,
        vf_coef=a.vf_coef, kl_kind=a.kl_kind, kl_coef=a.kl_coef,
        entropy_coef=a.entropy_coef, lm_coef=a.lm_coef, agg=a.loss_agg,
        global_tokens=counts.tokens, global_seqs=counts.seqs,
        global_positive_tokens=counts.positive_tokens, dp_size=counts.dp_size,
        **correction,
    )


@torch.no_grad()
def old_outputs(state: TrainState, batch: RolloutBatch, config: TrainConfig,
                timer: PhaseTimer, task: Task | None = None) -> tuple[OldOutputs, Tensor]:
    """Old log-probs, values and reference log-probs (no grad), then decoupled GAE (with
    ``--advantage mc`` the policy's advantages come from Monte-Carlo step values instead;
    the critic's targets stay GAE's)."""
    packed, r = uses_packed_forward(config), config.rollout
    pieces = micro_batches(batch, config, state.dp)  # the loss's memory bound holds here too

    def logprobs(model):
        return lambda part: policy_logprobs(model, part, temperature=r.temperature,
                                            logprobs_from=config.model.logprobs_from,
                                            packed=packed)[0]

    with timer("old_logprobs"):
        logp = in_pieces(batch, pieces, logprobs(state.policy))
        values = in_pieces(batch, pieces,
                           lambda part: value_estimates(state.value_model, part, packed=packed))
        ref_logp = None
        if state.reference is not None:
            ref_logp = in_pieces(batch, pieces, logprobs(state.reference))
    with timer("gae"):
        advantages, targets, lam_policy = compute_advantages(batch, values, config, state.dp)
    if config.algorithm.advantage == "mc" and task is not None:
        with timer("mc_advantage"):
            advantages = trainer_advantages(state, task, batch, config).to(advantages.device)
    return OldOutputs(logp, values, advantages, targets, ref_logp), lam_policy


def in_pieces(batch: RolloutBatch, pieces: list[Tensor],
              forward: Callable[[RolloutBatch], Tensor]) -> Tensor:
    """``forward`` (packed (N,) outputs) of ``batch`` run on each index set of ``pieces``
    (micro-batches) and put back in the batch's packed order; one piece: the whole batch,
    as is (the same numbers as an unsplit forward)."""
    if len(pieces) == 1:
        return forward(batch)
    out = None
    for index in pieces:
        part = forward(batch.select(index))
        if out is None:
            out = part.new_empty(batch.num_tokens)
        out[batch.token_index(index).to(part.device)] = part
    return out


def split(count: int, parts: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(order.chunk(parts))


def micro_batches(mini: RolloutBatch, config: TrainConfig, dp: DataParallel) -> list[Tensor]:
    """Index sets of the micro-batches of a mini-batch: at most ``micro_batch_size``
    sequences each (exactly that many when it divides the mini-batch), or packed under
    ``max_tokens_per_microbatch`` (rows x padded width; a longer sequence goes alone). With
    several processes every one runs the same number of micro-batches (FSDP's collectives
    pair up): with micro_batch_size their shares are equal, with the token budget it is
    the largest count over the processes."""
    o = config.optim
    if not o.max_tokens_per_microbatch:
        per = o.micro_batch_size or mini.size  # a bound: rounding the count up keeps it
        return split(mini.size, max(1, -(-mini.size // per)), None)
    widths = (mini.prompt_lengths + mini.response_lengths).tolist()
    plan: list[list[int]] = []
    for i in sorted(range(mini.size), key=lambda i: widths[i]):  # similar lengths together
        group = plan[-1] if plan else None
        if group and (len(group) + 1) * widths[i] <= o.max_tokens_per_microbatch:
            group.append(i)
        else:
            plan.append([i])
    wanted = int(dp.all_reduce([len(plan)], op="max")[0])
    while len(plan) < wanted:  # split the largest until the processes agree
        plan.sort(key=len)
        largest = plan.pop()
        plan += [largest[: len(largest) // 2], largest[len(largest) // 2:]]
    return [torch.tensor(group) for group in plan]


class MetricAccumulator:
    """Combines vapo_loss metrics over micro-batches and mini-batches into one row.

    Loss terms computed with global counts are shares of their mini-batch loss (summed per
    mini-batch, then averaged over mini-batches); rates are token-weighted means (``weights``:
    the tokens of each, so that over the processes they are means over every process's
    tokens); ranges (``*_min`` / ``*_max``: the ratio, the rollout weights) are min / max.
    """

    ADDITIVE = ("pg_loss", "vf_loss", "kl_loss", "entropy", "lm_loss")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.minibatches = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        tokens = float(metrics.get("tokens", 1.0))
        for key, value in metrics.items():
            if value is None or key == "tokens":
                continue
            v = float(value)
            if key.endswith("_min"):  # ratio_min, rollout_is_min: extremes, not means
                self.extremes[key] = min(self.extremes.get(key, v), v)
            elif key.endswith("_max"):
                self.extremes[key] = max(self.extremes.get(key, v), v)
            elif key in self.ADDITIVE:
                self.sums[key] = self.sums.get(key, 0.0) + v
            else:
                self.sums[key] = self.sums.get(key, 0.0) + v * tokens
                self.weights[key] = self.weights.get(key, 0.0) + tokens

    def row(self) -> dict[str, float]:
        """This process's row; :meth:`DataParallel.reduce_row` with ``weights=self.weights``
        combines it over the processes (done once per step, with the step's other metrics)."""
        out = dict(self.extremes)
        for key, total in self.sums.items():
            out[key] = total / self.weights[key] if key in self.weights else total / max(1, self.minibatches)
        return out


# Update metrics that are the same on every process already: the gradient norms (FSDP's
# are over the whole model) and the count of skipped updates (each skip is decided over
# all processes). A step's collective leaves them as they are.
GLOBAL_METRICS = ("actor_grad_norm", "critic_grad_norm", "skipped_updates")


def ppo_update(state: TrainState, batch: RolloutBatch, old: OldOutputs, config: TrainConfig,
               timer: PhaseTimer) -> tuple[dict[str, Any], dict[str, float]]:
    """PPO epochs over mini-batches; micro-batches accumulate gradients; both models step.

    Returns this process's metrics row and the token weights of its rates; the caller
    combines them over the processes together with the step's other metrics, in one
    collective (``reduce_row(row, weights=, combined=GLOBAL_METRICS)``)."""
    o = config.optim
    acc = MetricAccumulator()
    grad_norms: list[tuple[float, float]] = []
    skipped: list[str] = []
    for _epoch in range(o.ppo_epochs):
        for mini_index in split(batch.size, o.mini_batches, state.shuffle_generator):
            mini = batch.select(mini_index)
            counts = GlobalCounts.of(mini, state.dp)
            bad = None
            for micro_index in micro_batches(mini, config, state.dp):
                micro = mini.select(micro_index)
                tokens = batch.token_index(mini_index[micro_index])
                loss, metrics = micro_batch_loss(state, micro, old.select(tokens), counts,
                                                 config, timer)
                bad = bad or nonfinite({"loss": loss, **metrics})
                with timer("loss_backward"):
                    loss.backward()
                acc.add(metrics)
            acc.minibatches += 1
            with timer("optimizer"):
                norms, bad = guarded_update(
                    state, [("actor", state.policy, state.actor_optimizer, state.actor_scheduler),
                            ("critic", state.value_model, state.critic_optimizer,
                             state.critic_scheduler)], o.grad_clip, bad)
            grad_norms.append(tuple(norms))
            if bad is not None:
                skipped.append(bad)
    row: dict[str, Any] = acc.row()
    row["actor_grad_norm"] = sum(a for a, _ in grad_norms) / len(grad_norms)
    row["critic_grad_norm"] = sum(c for _, c in grad_norms) / len(grad_norms)
    row["skipped_updates"] = len(skipped)
    if skipped:
        row["nonfinite"] = skipped[0]
    return row, acc.weights


def sample(state: TrainState, problems: list, task: Task, config: TrainConfig,
           greedy: bool = False) -> RolloutBatch:
    """Responses to ``problems`` from the rollout engine; with the rollout correction on,
    each sampled token's log-prob as the engine computed it comes along."""
    r = config.rollout
    return (state.engine or generate)(
        state.policy, state.tokenizer, problems, task,
        max_new_tokens=max_new_tokens(config, task), temperature=r.temperature, greedy=greedy,
        record_logprobs=not greedy and r.rollout_is != "none")


def rollout(state: TrainState, task: Task, config: TrainConfig) -> RolloutBatch:
    return sample(state, sample_problems(state, task, config), task, config)


def batch_metrics(batch: RolloutBatch, lam_policy: Tensor | None) -> dict[str, float]:
    lengths = batch.response_lengths.float()
    out = {"reward": batch.scores.mean().item(), "response_length": lengths.mean().item(),
           "response_length_max": lengths.max().item(), "verifier_errors": batch.verifier_errors}
    if lam_policy is not None:
        out["lam_policy_min"] = float(lam_policy.min())
        out["lam_policy_max"] = float(lam_policy.max())
    return out


# -- value pretraining -------------------------------------------------------------------------
def value_pretrain(state: TrainState, task: Task, config: TrainConfig, log: MetricsLogger,
                   resume: bool = False) -> None:
    """Fit the critic to the warmed-up policy's Monte-Carlo returns before any policy update
    (VAPO §3.1: without it the early advantages come from a random critic)."""
    steps = config.algorithm.value_pretrain_steps
    log.start_phase("value_pretrain", steps)
    if resume:
        log.advance(state.step)
    else:
        state.phase, state.step = "value_pretrain", 0
        after_step(state, config, None, log)
    for step in range(state.step + 1, steps + 1):
        state.step = step
        timer = PhaseTimer()
        with timer("rollout"):
            batch = rollout(state, task, config)
        old, lam_policy = old_outputs(state, batch, config, timer)
        acc = MetricAccumulator()
        skipped: list[str] = []
        for mini_index in split(batch.size, config.optim.mini_batches, state.shuffle_generator):
            mini = batch.select(mini_index)
            counts = GlobalCounts.of(mini, state.dp)
            micros = micro_batches(mini, config, state.dp)  # --micro_batch_size / token budget
            bad = None
            for micro_index in micros:
                micro = mini.select(micro_index)
                tokens = batch.token_index(mini_index[micro_index])
                targets = old.targets[tokens.to(old.targets.device)]
                old_values = old.values[tokens.to(old.values.device)]
                with timer("loss_forward"):
                    values = value_estimates(state.value_model, micro,
                                             packed=uses_packed_forward(config))
                    a = config.algorithm
                    # Global counts with several processes or micro-batches (each one's
                    # loss is its share of the mini-batch's); else the op's own local
                    # normalisation (the same numbers as before DP existed).
                    dp_counts = {} if not (state.dp.distributed or len(micros) > 1) else dict(
                        global_tokens=counts.tokens, global_seqs=counts.seqs,
                        dp_size=counts.dp_size)
                    with our_op("vapo_loss"):
                        loss, metrics = vk.vapo_loss(
                            None, values=values, old_values=old_values, returns=targets,
                            cu_seqlens=micro.cu_seqlens.to(values.device),
                            value_clip=a.value_clip or None, vf_coef=1.0, agg=a.loss_agg,
                            **dp_counts)
                with timer("loss_backward"):
                    loss.backward()
                bad = bad or nonfinite({"loss": loss, **metrics})
                acc.add(metrics)
            with timer("optimizer"):
                _, bad = guarded_update(
                    state, [("critic", state.value_model, state.critic_optimizer, None)],
                    config.optim.grad_clip, bad)
            if bad is not None:
                skipped.append(bad)
            acc.minibatches += 1
        log.advance()
        row = {**batch_metrics(batch, lam_policy), **acc.row(), "skipped_updates": len(skipped),
               **timer.rows(), **peak_memory_mb()}
        row = state.dp.reduce_row(row, weights=acc.weights, combined=GLOBAL_METRICS)
        row["since_warmup_s"] = round(time.perf_counter() - state.warmup_end_time, 3)
        log.log("value_pretrain", step, **row)
        after_step(state, config, skipped[0] if skipped else None, log)
    log.close_bar()


# -- the whole run -------------------------------------------------------------------------------
def setup_rl(state: TrainState, config: TrainConfig,
             make_value_model: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Value model (from the warmed-up policy unless given), frozen reference, optimizers."""
    o = config.optim
    state.warmup_optimizer = None  # the warm-up is over; RL has its own optimizers
    if state.value_model is None:
        state.value_model = make_value_model(state.policy)
    dropout_off(state.value_model.to(next(state.policy.parameters()).device))
    if config.algorithm.kl_coef > 0:
        state.reference = copy.deepcopy(state.policy).eval().requires_grad_(False)
    state.actor_optimizer = torch.optim.AdamW(state.policy.parameters(), lr=o.actor_lr,
                                              weight_decay=o.weight_decay)
    state.critic_optimizer = torch.optim.AdamW(state.value_model.parameters(), lr=o.critic_lr,
                                               weight_decay=o.weight_decay)
    state.actor_scheduler = constant_after_warmup(state.actor_optimizer, o.lr_warmup_steps)
    state.critic_scheduler = constant_after_warmup(state.critic_optimizer, o.lr_warmup_steps)


def apply_optimizer_options(state: TrainState, config: TrainConfig) -> None:
    """After a checkpoint has loaded: the learning rates and weight decay of this run's
    config, not the saved ones (loading the optimizers' param_groups and the schedulers'
    base_lrs would silently undo a changed --actor_lr / --critic_lr / --warmup_lr /
    --weight_decay). A learning rate goes in through its scheduler's base_lrs, so the
    schedule continues from the new base at the step it had reached. The rate is always
    recomputed from this run's schedule (the same expression LambdaLR uses, so an unchanged
    run gets the loaded bits): a changed --lr_warmup_steps alone left the first resumed
    step on the old schedule's rate."""
    o = config.optim
    for optimizer, scheduler, lr in ((state.warmup_optimizer, None, config.warmup.warmup_lr),
                                     (state.actor_optimizer, state.actor_scheduler, o.actor_lr),
                                     (state.critic_optimizer, state.critic_scheduler,
                                      o.critic_lr)):
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            group["weight_decay"] = o.weight_decay
        if scheduler is None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        else:
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"] = lr
                group["lr"] = lr * factor(scheduler.last_epoch)  # as LambdaLR computes it
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def rl(state: TrainState, task: Task, config: TrainConfig, log: MetricsLogger,
       resume: bool = False, profiler: Any = None) -> dict[str, float]:
    """The RL steps; held-out accuracy before the first update and every eval_every steps.
    ``profiler`` (a :class:`.profiling.StepProfiler`) is told when each step starts and ends."""
    run = config.run
    log.start_phase("rl", run.steps)
    if resume:
        last_eval = state.last_eval
        log.advance(state.step)
    else:
        state.phase, state.step = "rl", 0
        last_eval = state.last_eval = evaluate(state, task, config)
        log.log("rl", 0, **last_eval,
                since_warmup_s=round(time.perf_counter() - state.warmup_end_time, 3))
        after_step(state, config, None, log, last=run.steps == 0)
    for step in range(state.step + 1, run.steps + 1):
        state.step = step
        if profiler is not None:
            profiler.step_start(step)
        timer = PhaseTimer()
        with timer("rollout"):                                   # 1. sample groups
            batch = rollout(state, task, config)                 # 2. rewards (verifier)
        old, lam_policy = old_outputs(state, batch, config, timer, task)  # 3. values, 4. GAE
        update, weights = ppo_update(state, batch, old, config, timer)  # 5. PPO epochs
        bad = update.pop("nonfinite", None)
        row = {**batch_metrics(batch, lam_policy), **update, **timer.rows(), **peak_memory_mb()}
        row = state.dp.reduce_row(row, weights=weights, combined=GLOBAL_METRICS)  # one collective
        if profiler is not None:
            profiler.step_end(step)
        if step % run.eval_every == 0 or step == run.steps:
            last_eval = state.last_eval = evaluate(state, task, config)
            row.update(last_eval)
        row["since_warmup_s"] = round(time.perf_counter() - state.warmup_end_time, 3)
        log.log("rl", step, **row)
        log.advance()
        after_step(state, config, bad, log, last=step == run.steps)
    log.close_bar()
    return last_eval
