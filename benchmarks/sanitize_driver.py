"""Call every CUDA and Triton GAE kernel once on small ragged inputs.

Meant to run under NVIDIA's compute-sanitizer (benchmarks/gpu_check.sh does):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 benchmarks/sanitize_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 benchmarks/sanitize_driver.py

Covers, for the CUDA C++ kernel: every storage dtype, both mask modes and the maskless
variant, block sizes from one warp to 1024 threads (each input has sequences that are
empty, one token long, end inside a group and straddle chunks), and the unaligned
(scalar-access) path. For Triton: every dtype and mask mode, in both launch plans (one
program per sequence, and the two-phase segment plan), and once through the public op.
Each output is checked loosely against the float64 reference so that a kernel that
"runs clean" but computes garbage does not pass silently. Exit status 0 = all ran.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vapo_kernels
from vapo_kernels import _backends
from vapo_kernels.ops.gae import reference_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MODES = (("skip", True, True), ("zero", False, True), ("nomask", True, False))
LENGTHS = [0, 1, 7, 8, 9, 300, 2049, 0, 5000, 3]  # ~7.4k tokens


def make_inputs(dtype, masked, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *LENGTHS], dtype=torch.int64).cumsum(0)
    n = int(offsets[-1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lam = torch.rand(len(LENGTHS), generator=g, dtype=torch.float64)
    return {
        "rewards": torch.randn(n, generator=g).to(dtype).to(device),
        "values": torch.randn(n, generator=g).to(dtype).to(device),
        "mask": (torch.rand(n, generator=g) > 0.3).to(device) if masked else None,
        "offsets": offsets.to(device),
        "coef_policy": (0.99 * lam).to(acc).to(device),
        "coef_critic": torch.full((len(LENGTHS),), 0.99, dtype=acc, device=device),
        "gamma": 0.99,
    }


def check(name, got, inp, skip):
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    want = reference_kernel(
        cpu["rewards"].double(),
        cpu["values"].double(),
        cpu["mask"],
        cpu["offsets"],
        cpu["coef_policy"].double(),
        cpu["coef_critic"].double(),
        cpu["gamma"],
        skip,
    )
    for g, w in zip(got, want):
        err = (g.double().cpu() - w).abs().max().item()
        if not err <= 1e-3 * max(1.0, w.abs().max().item()):
            raise AssertionError(f"{name}: max error {err:.3g} against the float64 reference")


ARG_ORDER = ("rewards", "values", "mask", "offsets", "coef_policy", "coef_critic", "gamma")
failures: list[str] = []


def attempt(name, fn) -> None:
    """Run one launch; a failure is reported and counted, and the next launch still runs."""
    try:
        fn()
        torch.cuda.synchronize()  # an asynchronous fault surfaces here, under its name
        print(f"ok      {name}")
    except Exception as e:  # noqa: BLE001 - every kernel gets its turn
        print(f"FAILED  {name}: {type(e).__name__}: {e}")
        failures.append(name)


def shifted_by_one(inp):
    """The same inputs one element into a buffer: misaligned base pointers."""
    out = dict(inp)
    for key in ("rewards", "values", "mask"):
        if inp[key] is not None:
            buf = torch.empty(inp[key].numel() + 1, dtype=inp[key].dtype, device="cuda")
            buf[1:] = inp[key]
            out[key] = buf[1:]
    return out


def run_cuda(ext) -> None:
    def launch(name, inp, skip, threads, data=None):
        def go():
            os.environ["VAPO_GAE_CUDA_THREADS"] = threads
            try:
                got = ext.gae_scan_cuda(*((data or inp)[k] for k in ARG_ORDER), skip)
            finally:
                os.environ.pop("VAPO_GAE_CUDA_THREADS", None)
            check(name, got, inp, skip)

        attempt(name, go)

    for i, dtype in enumerate(DTYPES):
        for mode, skip, masked in MODES:
            inp = make_inputs(dtype, masked, "cuda", seed=i)
            for threads in ("32", "96", "0", "1024"):  # "0": the launcher's own choice
                launch(f"cuda {dtype} {mode} threads={threads}", inp, skip, threads)
            launch(f"cuda {dtype} {mode} unaligned", inp, skip, "64", shifted_by_one(inp))
    inp = make_inputs(torch.float32, True, "cuda", seed=99)
    attempt(
        "cuda public op (decoupled_gae, alpha=0.05)",
        lambda: vapo_kernels.decoupled_gae(
            inp["rewards"], inp["values"], inp["mask"], inp["offsets"], alpha=0.05, backend="cuda"
        ),
    )


def run_triton() -> None:
    from vapo_kernels.triton.gae import gae_scan

    # segments=1: one program per sequence (_gae_seq_kernel); segments=4: the two-phase
    # plan for few long sequences (_gae_summary_kernel + _gae_segment_kernel).
    for i, dtype in enumerate(DTYPES):
        for mode, skip, masked in MODES:
            inp = make_inputs(dtype, masked, "cuda", seed=100 + i)
            for segments in (1, 4):
                name = f"triton {dtype} {mode} segments={segments}"

                def go(inp=inp, skip=skip, segments=segments, name=name):
                    got = gae_scan(*(inp[k] for k in ARG_ORDER), skip, segments=segments)
                    check(name, got, inp, skip)

                attempt(name, go)
    inp = make_inputs(torch.float32, True, "cuda", seed=199)
    attempt(
        "triton public op (decoupled_gae, alpha=0.05)",
        lambda: vapo_kernels.decoupled_gae(
            inp["rewards"],
            inp["values"],
            inp["mask"],
            inp["offsets"],
            alpha=0.05,
            backend="triton",
        ),
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 1
    for backend, run in (("cuda", lambda: run_cuda(_backends.extension())), ("triton", run_triton)):
        why = _backends._why_unavailable(backend, torch.device("cuda"))
        if why:
            print(f"FAILED  {backend}: backend unavailable ({why})")
            failures.append(backend)
        else:
            run()
    print(f"sanitize_driver: {len(failures)} failed" + (f": {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
