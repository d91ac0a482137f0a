"""Vocabulary-parallel ``linear_logprobs(process_group=...)`` on 2 CPU processes (gloo).

Each rank holds a contiguous, uneven shard of the LM head's rows; logp, entropy and
grad_hidden must equal the single-process result on the whole head on every rank, and
each rank's grad_weight / grad_bias must equal its rows of the full gradient. Both
backends run (Triton through the interpreter when there is no GPU).

The ranks run in a fresh interpreter (``python -c``) that spawns them: a child of the
pytest process would inherit its state (hypothesis, poisoned allocations, dynamo).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

_SCRIPT = textwrap.dedent(
    r"""
    import os, sys
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton interpreter
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    WORLD = 2


    def check(rank, init_file):
        from vapo_kernels import linear_logprobs

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        group = dist.new_group(ranks=list(range(WORLD)))
        n, dim, vocab = 23, 20, 37
        sizes = [20, 17]  # uneven shards; rank 1 starts at global id 20
        v0 = sum(sizes[:rank])
        v1 = v0 + sizes[rank]
        done = 0
        for backend in ("reference", "triton"):
            for dtype in (torch.float64, torch.float32):
                for with_bias in (True, False):
                    gen = torch.Generator().manual_seed(11)  # identical data on every rank
                    h = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(dtype)
                    w = (0.5 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)).to(dtype)
                    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
                    b[3] = float("-inf")  # a forbidden token on rank 0
                    y = torch.randint(0, vocab, (n,), generator=gen)
                    y[0], y[1], y[2] = 0, vocab - 1, sizes[0]  # first and last id of each shard
                    y[5] = -100
                    mask = torch.rand(n, generator=gen) < 0.85
                    mask[7] = False
                    y[7] = 10**6  # garbage id in a masked row: ignored, as without a group
                    w_lp = torch.randn(n, generator=gen, dtype=torch.float64)
                    w_ent = torch.randn(n, generator=gen, dtype=torch.float64)
                    bias = b if with_bias else None

                    def run(h, w, bias, group):
                        out = linear_logprobs(
                            h, w, y, bias=bias, temperature=0.8, return_entropy=True,
                            mask=mask, process_group=group, backend=backend,
                        )
                        ((out[0].double() * w_lp).sum() + (out[1].double() * w_ent).sum()).backward()
                        return out

                    full = [t.clone().requires_grad_(True) for t in (h, w, b)]
                    logp, ent = run(full[0], full[1], full[2] if with_bias else None, None)
                    part = [h.clone(), w[v0:v1].clone(), b[v0:v1].clone()]
                    part = [t.requires_grad_(True) for t in part]
                    logp_p, ent_p = run(part[0], part[1], part[2] if with_bias else None, group)

                    tol = 1e-12 if dtype == torch.float64 else 2e-5
                    close = lambda a, b: torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # noqa: E731
                    what = f"rank {rank} {backend} {dtype} bias={with_bias}"
                    try:
                        close(logp_p, logp)
                        close(ent_p, ent)
                        close(part[0].grad, full[0].grad)  # every rank: the full gradient
                        close(part[1].grad, full[1].grad[v0:v1])  # its own rows only
                        if with_bias:
                            close(part[2].grad, full[2].grad[v0:v1])
                        else:
                            assert part[2].grad is None
                    except AssertionError as e:
                        raise AssertionError(f"{what}: {e}") from None
                    done += 1
        dist.barrier()  # without it, destroy_process_group sometimes aborts on gloo
        dist.destroy_process_group()
        print(f"rank {rank}: {done} cases agree", flush=True)


    if __name__ == "__main__":
        mp.spawn(check, args=(sys.argv[1],), nprocs=WORLD, join=True)
    """
)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_vocab_parallel_matches_single_process(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",  # two ranks on a small machine
    }
    script = tmp_path / "tp_check.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init")],
        check=False, capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(2):
        assert f"rank {rank}: 8 cases agree" in proc.stdout, proc.stdout + proc.stderr
