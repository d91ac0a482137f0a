"""Rows with a dominant logit, rows of only large logits, and the check that a gradient
there is as exact as on ordinary rows (shared by the log-prob, linear and loss tests).

Why: a backward that forms ``p = exp(z / tau - lse)`` from a float32 lse loses
ulp(1e4 / tau) ~ 1e-3 in the exponent, so the probability of a logit of 1e4 came out
1 +- 1e-4 instead of 1 (a gradient off by ~1e-4 at temperature 1.3, by ~1e-3 at 0.7);
measured relative to the row max, as the forward is, it is exactly 1.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
VOCAB = 40
DOM = 5  # column of the dominant logit

# Two rows of each kind, then ordinary rows: the tolerance below is their level.
KINDS = ("one+1e4", "one-1e4", "all+1e4", "all-1e4", "ordinary")


def rows(dtype, *, seed=0, loss_targets=False):
    """(logits (10, VOCAB) in ``dtype``, targets (10,), kind of each row).

    ``one+-1e4``: ordinary logits (2 randn) and one of +-1e4 at column DOM; ``all+-1e4``:
    +-1e4 + 2 randn everywhere, so every exponent is a difference of large numbers.
    Targets alternate between DOM and an ordinary column. With ``loss_targets`` no target
    has a log-prob of ~ -1e4 / tau (DOM on ``one+1e4`` rows, never DOM on ``one-1e4``
    rows): the float32 rounding of such a log-prob (~1e-4 relative to 1) would reach the
    loss gradient through the ratio, whatever the backward does.
    """
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(2 * len(KINDS), VOCAB, generator=gen, dtype=F64)
    kinds = [k for k in KINDS for _ in range(2)]
    for r, kind in enumerate(kinds):
        if kind.startswith("one"):
            z[r, DOM] = float(kind[3:])
        elif kind.startswith("all"):
            z[r] += float(kind[3:])
    targets = torch.randint(0, VOCAB, (len(kinds),), generator=gen)
    targets[targets == DOM] = DOM + 1
    targets[0::2] = DOM
    if loss_targets:
        targets[[r for r, k in enumerate(kinds) if k == "one+1e4"]] = DOM
        targets[[r for r, k in enumerate(kinds) if k == "one-1e4"]] = DOM + 2
    return z.to(dtype), targets, kinds


def fp64_logp_entropy(z, targets, temperature):
    """Straight from the definitions, float64, differentiable."""
    logsm = torch.log_softmax(z.double() / temperature, dim=-1)
    p = logsm.exp()
    logp = logsm.gather(-1, targets[..., None]).squeeze(-1)
    return logp, -torch.where(p > 0, p * logsm, 0).sum(-1)


def ulp(x, dtype):
    """The spacing of ``dtype`` at |x| (0 at 0)."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp(min=1e-300)))
    return torch.where(x == 0, 0, torch.exp2(e - bits + 1))


def assert_grad_exact(got, want, kinds, dtype, what="", rounding=0.5):
    """``got`` (rows, V) in ``dtype`` against the float64 ``want``: within the rounding to
    ``dtype`` (``rounding`` ulps: 0.5 for round-to-nearest; 1 where the cast may truncate,
    as the Triton interpreter's float32 -> bf16 does) plus 2e-6 of the row scale, on every
    kind of row alike. float32 arithmetic on ordinary rows is ~1e-7 off; the old lse-based
    backward was 1e-4 to 1e-3 off at the large rows."""
    got, want = got.double().cpu(), want.double().cpu()
    scale = 1.0 + float(want.abs().max())
    tol = 2e-6 * scale + (rounding * ulp(want, dtype) if dtype != torch.float32 else 0)
    err = (got - want).abs()
    excess = (err - tol).amax(dim=-1)
    by_kind = {k: max(float(err[r].max()) for r, kr in enumerate(kinds) if kr == k) for k in KINDS}
    bad = [kinds[r] for r in range(len(kinds)) if excess[r] > 0]
    assert not bad, (
        f"{what}: gradient error above tolerance on rows {sorted(set(bad))}; max error by "
        f"kind {by_kind}, tolerance 2e-6 * {scale:.3g} (+ {rounding} ulp of {dtype})"
    )
    assert math.isfinite(float(err.max()))


def policy_loss_grads(dtype, temperature, backend, device="cpu", seed=2):
    """(d loss / d logits from ``backend`` on ``dtype`` logits, the same from the float64
    reference, row kinds) for the fused policy + entropy loss from logits
    (``vk.policy_loss_from_logits``), rows as :func:`rows` with ``loss_targets``, padded
    (2, T, V). old_logp puts every ratio within 5% of 1, far from the clip bounds, so the
    float32 and float64 runs take the same branches."""
    import vapo_kernels as vk

    z, y, kinds = rows(dtype, loss_targets=True)
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    lp64, _ = fp64_logp_entropy(z, y, temperature)
    old = (lp64 + 0.1 * torch.rand(n, generator=gen, dtype=F64) - 0.05).float()
    adv = torch.randn(n, generator=gen).float()
    shape = (2, n // 2)

    def grad(logits, backend, acc, device):
        x = logits.view(*shape, -1).to(device).clone().requires_grad_(True)
        loss, _ = vk.policy_loss_from_logits(
            x, y.view(shape).to(device), old.to(acc).view(shape).to(device),
            adv.to(acc).view(shape).to(device), temperature=temperature, entropy_coef=0.3,
            backend=backend,
        )
        loss.backward()
        return x.grad.view(n, -1)

    got = grad(z, backend, torch.float32, device)
    want = grad(z.double(), "reference", F64, "cpu")
    return got, want, kinds
