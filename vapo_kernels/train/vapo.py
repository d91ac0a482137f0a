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
from .metrics import MetricsLogger, PhaseTimer
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
    phase: str = "warmup"
    step: int = 0
    warmup_end_time: float | None = None


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
    return [p for p in prompts for _ in range(config.samples_per_prompt)]


@torch.no_grad()
def evaluate(state: TrainState, task: Task, config: TrainConfig) -> dict[str, float]:
    """Greedy held-out accuracy (overall, and on the shorter / longer half of chain lengths)."""
    problems = task.heldout()
    batch = generate(state.policy, state.tokenizer, problems, task,
                     max_new_tokens=max_new_tokens(config, task),
                     temperature=config.rollout.temperature, greedy=True)
    out = {"heldout_accuracy": batch.scores.mean().item(),
           "heldout_response_length": batch.response_lengths.float().mean().item()}
    steps = torch.tensor([p.steps for p in problems])
    if steps.max() > steps.min():
        middle = (steps.min() + steps.max()) / 2
        out["heldout_accuracy_short"] = batch.scores[steps <= middle].mean().item()
        out["heldout_accuracy_long"] = batch.scores[steps > middle].mean().item()
    return out


def _clip_and_step(model, optimizer, scheduler, grad_clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(norm)


# -- supervised warm-up (and the supervised baseline) ------------------------------------------
def supervised_loss(policy, batch: RolloutBatch, config: TrainConfig) -> tuple[Tensor, dict]:
    """Mean NLL of the demonstrations: VAPO's positive-example LM term with every sequence
    positive and weight 1, so even the warm-up's loss comes from vk.vapo_loss."""
    logp, _ = policy_logprobs(policy, batch, temperature=1.0,
                              logprobs_from=config.model.logprobs_from,
                              packed=uses_packed_forward(config))
    positive = torch.ones(batch.size, dtype=torch.bool, device=logp.device)
    return vk.vapo_loss(logp, None, None, None, batch.cu_seqlens.to(logp.device),
                        positive=positive, lm_coef=1.0)


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
) -> dict[str, float]:
    """Supervised steps on demonstrations until ``max_steps``, the target held-out accuracy,
    or ``max_seconds``; returns the last evaluation."""
    w = config.warmup
    optimizer = torch.optim.AdamW(state.policy.parameters(), lr=w.warmup_lr,
                                  weight_decay=config.optim.weight_decay)
    state.phase, start = phase, time.perf_counter()
    log.start_phase(phase, max_steps if math.isinf(max_seconds) else None)
    last_eval = evaluate(state, task, config)
    since = {} if state.warmup_end_time is None else {
        "since_warmup_s": round(time.perf_counter() - state.warmup_end_time, 3)}
    log.log(phase, 0, **last_eval, **since)
    for step in range(1, max_steps + 1):
        state.step = step
        batch = demonstration_batch(state.tokenizer, task, state.task_rng, w.warmup_batch_size)
        loss, _ = supervised_loss(state.policy, batch, config)
        loss.backward()
        _clip_and_step(state.policy, optimizer, None, config.optim.grad_clip)
        log.advance()
        row: dict[str, Any] = {"lm_loss": loss.item()}
        done = time.perf_counter() - start >= max_seconds or step == max_steps
        if step % w.warmup_eval_every == 0 or done:
            last_eval = evaluate(state, task, config)
            row.update(last_eval)
        if state.warmup_end_time is not None:
            row["since_warmup_s"] = round(time.perf_counter() - state.warmup_end_time, 3)
        log.log(phase, step, **row)
        if done or (stop_accuracy is not None and "heldout_accuracy" in row
                    and row["heldout_accuracy"] >= stop_accuracy):
            break
    log.close_bar()
    return last_eval


# -- the RL pieces -------------------------------------------------------------------------------
def compute_advantages(batch: RolloutBatch, values: Tensor, config: TrainConfig
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(advantages, value_targets, lambda_policy per sequence)`` from one vk.decoupled_gae call.

    Each switch maps onto the op's arguments: length-adaptive (VAPO) derives
    lambda_policy = 1 - 1/(alpha l) per sequence; not decoupled gives the critic the policy's
    lambda too.
    """
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
        whiten=a.whiten_advantages,
    )
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

    @classmethod
    def of(cls, batch: RolloutBatch) -> GlobalCounts:
        lengths = batch.response_lengths
        return cls(float(lengths.sum()), float((lengths > 0).sum()),
                   float(lengths[batch.scores > 0].sum()))


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
        loss, metrics = vk.vapo_loss(
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
            global_positive_tokens=counts.positive_tokens,
        )
    return loss, metrics


@torch.no_grad()
def old_outputs(state: TrainState, batch: RolloutBatch, config: TrainConfig,
                timer: PhaseTimer) -> tuple[OldOutputs, Tensor]:
    """Old log-probs, values and reference log-probs (no grad), then decoupled GAE."""
    packed, r = uses_packed_forward(config), config.rollout
    with timer("old_logprobs"):
        logp, _ = policy_logprobs(state.policy, batch, temperature=r.temperature,
                                  logprobs_from=config.model.logprobs_from, packed=packed)
        values = value_estimates(state.value_model, batch, packed=packed)
        ref_logp = None
        if state.reference is not None:
            ref_logp, _ = policy_logprobs(state.reference, batch, temperature=r.temperature,
                                          logprobs_from=config.model.logprobs_from, packed=packed)
    with timer("gae"):
        advantages, targets, lam_policy = compute_advantages(batch, values, config)
    return OldOutputs(logp, values, advantages, targets, ref_logp), lam_policy


def split(count: int, parts: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return list(order.chunk(parts))


class MetricAccumulator:
    """Combines vapo_loss metrics over micro-batches and mini-batches into one row.

    Loss terms computed with global counts are shares of their mini-batch loss (summed per
    mini-batch, then averaged over mini-batches); rates are token-weighted means; the ratio
    range is min / max.
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
            if key == "ratio_min":
                self.extremes[key] = min(self.extremes.get(key, v), v)
            elif key == "ratio_max":
                self.extremes[key] = max(self.extremes.get(key, v), v)
            elif key in self.ADDITIVE:
                self.sums[key] = self.sums.get(key, 0.0) + v
            else:
                self.sums[key] = self.sums.get(key, 0.0) + v * tokens
                self.weights[key] = self.weights.get(key, 0.0) + tokens

    def row(self) -> dict[str, float]:
        out = dict(self.extremes)
        for key, total in self.sums.items():
            out[key] = total / self.weights[key] if key in self.weights else total / max(1, self.minibatches)
        return out


def ppo_update(state: TrainState, batch: RolloutBatch, old: OldOutputs, config: TrainConfig,
               timer: PhaseTimer) -> dict[str, float]:
    """PPO epochs over mini-batches; micro-batches accumulate gradients; both models step."""
    o = config.optim
    acc = MetricAccumulator()
    grad_norms: list[tuple[float, float]] = []
    for _epoch in range(o.ppo_epochs):
        for mini_index in split(batch.size, o.mini_batches, state.shuffle_generator):
            mini = batch.select(mini_index)
            counts = GlobalCounts.of(mini)
            micro_size = o.micro_batch_size or mini.size
            for micro_index in split(mini.size, max(1, mini.size // micro_size), None):
                micro = mini.select(micro_index)
                tokens = batch.token_index(mini_index[micro_index])
                loss, metrics = micro_batch_loss(state, micro, old.select(tokens), counts,
                                                 config, timer)
                with timer("loss_backward"):
                    loss.backward()
                acc.add(metrics)
            acc.minibatches += 1
            with timer("optimizer"):
                actor_norm = _clip_and_step(state.policy, state.actor_optimizer,
                                            state.actor_scheduler, o.grad_clip)
                critic_norm = _clip_and_step(state.value_model, state.critic_optimizer,
                                             state.critic_scheduler, o.grad_clip)
            grad_norms.append((actor_norm, critic_norm))
    row = acc.row()
    row["actor_grad_norm"] = sum(a for a, _ in grad_norms) / len(grad_norms)
    row["critic_grad_norm"] = sum(c for _, c in grad_norms) / len(grad_norms)
    return row


def rollout(state: TrainState, task: Task, config: TrainConfig) -> RolloutBatch:
    return generate(state.policy, state.tokenizer, sample_problems(state, task, config), task,
                    max_new_tokens=max_new_tokens(config, task),
                    temperature=config.rollout.temperature)


def batch_metrics(batch: RolloutBatch, lam_policy: Tensor | None) -> dict[str, float]:
    lengths = batch.response_lengths.float()
    out = {"reward": batch.scores.mean().item(), "response_length": lengths.mean().item(),
           "response_length_max": lengths.max().item()}
    if lam_policy is not None:
        out["lam_policy_min"] = float(lam_policy.min())
        out["lam_policy_max"] = float(lam_policy.max())
    return out


# -- value pretraining -------------------------------------------------------------------------
def value_pretrain(state: TrainState, task: Task, config: TrainConfig, log: MetricsLogger) -> None:
    """Fit the critic to the warmed-up policy's Monte-Carlo returns before any policy update
    (VAPO §3.1: without it the early advantages come from a random critic)."""
    steps = config.algorithm.value_pretrain_steps
    state.phase = "value_pretrain"
    log.start_phase("value_pretrain", steps)
    for step in range(1, steps + 1):
        state.step = step
        timer = PhaseTimer()
        with timer("rollout"):
            batch = rollout(state, task, config)
        old, lam_policy = old_outputs(state, batch, config, timer)
        acc = MetricAccumulator()
        for mini_index in split(batch.size, config.optim.mini_batches, state.shuffle_generator):
            mini = batch.select(mini_index)
            targets = old.targets[batch.token_index(mini_index).to(old.targets.device)]
            old_values = old.values[batch.token_index(mini_index).to(old.values.device)]
            with timer("loss_forward"):
                values = value_estimates(state.value_model, mini, packed=uses_packed_forward(config))
                a = config.algorithm
                loss, metrics = vk.vapo_loss(
                    None, values=values, old_values=old_values, returns=targets,
                    cu_seqlens=mini.cu_seqlens.to(values.device),
                    value_clip=a.value_clip or None, vf_coef=1.0, agg=a.loss_agg)
            with timer("loss_backward"):
                loss.backward()
            with timer("optimizer"):
                _clip_and_step(state.value_model, state.critic_optimizer, None,
                               config.optim.grad_clip)
            acc.add(metrics)
            acc.minibatches += 1
        log.advance()
        row = {**batch_metrics(batch, lam_policy), **acc.row(), **timer.rows(),
               "since_warmup_s": round(time.perf_counter() - state.warmup_end_time, 3)}
        log.log("value_pretrain", step, **row)
    log.close_bar()


# -- the whole run -------------------------------------------------------------------------------
def setup_rl(state: TrainState, config: TrainConfig,
             make_value_model: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Value model (from the warmed-up policy unless given), frozen reference, optimizers."""
    o = config.optim
    if state.value_model is None:
        state.value_model = make_value_model(state.policy)
    state.value_model.to(next(state.policy.parameters()).device).train()
    if config.algorithm.kl_coef > 0:
        state.reference = copy.deepcopy(state.policy).eval().requires_grad_(False)
    state.actor_optimizer = torch.optim.AdamW(state.policy.parameters(), lr=o.actor_lr,
                                              weight_decay=o.weight_decay)
    state.critic_optimizer = torch.optim.AdamW(state.value_model.parameters(), lr=o.critic_lr,
                                               weight_decay=o.weight_decay)
    state.actor_scheduler = constant_after_warmup(state.actor_optimizer, o.lr_warmup_steps)
    state.critic_scheduler = constant_after_warmup(state.critic_optimizer, o.lr_warmup_steps)


def rl(state: TrainState, task: Task, config: TrainConfig, log: MetricsLogger) -> dict[str, float]:
    """The RL steps; held-out accuracy before the first update and every eval_every steps."""
    run = config.run
    state.phase = "rl"
    log.start_phase("rl", run.steps)
    last_eval = evaluate(state, task, config)
    log.log("rl", 0, **last_eval, since_warmup_s=round(time.perf_counter() - state.warmup_end_time, 3))
    for step in range(1, run.steps + 1):
        state.step = step
        timer = PhaseTimer()
        with timer("rollout"):                                   # 1. sample groups
            batch = rollout(state, task, config)                 # 2. rewards (verifier)
        old, lam_policy = old_outputs(state, batch, config, timer)  # 3. values, 4. decoupled GAE
        row = {**batch_metrics(batch, lam_policy),
               **ppo_update(state, batch, old, config, timer)}   # 5. PPO epochs of vapo_loss
        row.update(timer.rows())
        if step % run.eval_every == 0 or step == run.steps:
            last_eval = evaluate(state, task, config)
            row.update(last_eval)
        row["since_warmup_s"] = round(time.perf_counter() - state.warmup_end_time, 3)
        log.log("rl", step, **row)
        log.advance()
    log.close_bar()
    return last_eval
