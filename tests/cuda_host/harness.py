"""Build and run the host emulator of the CUDA GAE kernel (gae_emulator.cpp).

Shared by tests/test_gae_cuda_host.py (CPU-only checks of the kernel's logic) and
tests/test_gae_cuda.py (the GPU kernel compared bit for bit with the emulator). Loaded by
path (see ``load``) so it does not depend on how the tests directory is packaged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCE = HERE / "gae_emulator.cpp"
HEADERS = [REPO / "csrc" / "cuda" / "gae_scan_block.cuh"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

_COMMON = ["-std=c++20", "-g", "-pthread", "-ffp-contract=off", "-Wall", "-Wextra"]
VARIANTS = {
    "plain": ["-O2"],
    # AddressSanitizer (with poisoned guards around every array) + UndefinedBehaviorSanitizer.
    "asan": [
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
    ],
    # ThreadSanitizer: the shared-memory protocol between barriers.
    "tsan": ["-O1", "-fsanitize=thread"],
}


class Unavailable(Exception):
    """The emulator cannot be built here (no C++20 compiler or no CUDA headers)."""


def cuda_include() -> Path | None:
    """The CUDA toolkit's include dir (for cuda_fp16.h), or None."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / "cuda_fp16.h").exists():
            return c
    return None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _cache_dir() -> Path:
    root = os.environ.get("VAPO_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vapo_kernels"
    )
    return Path(root) / "gae_emulator"


def build(variant: str = "plain") -> Path:
    """Compile the emulator (cached by source hash and flags); raises Unavailable."""
    cxx, inc = compiler(), cuda_include()
    if cxx is None:
        raise Unavailable("no C++ compiler (g++/clang++)")
    if inc is None:
        raise Unavailable("no CUDA headers (cuda_fp16.h) found")
    flags = [*_COMMON, *VARIANTS[variant], f"-I{REPO / 'csrc'}", "-isystem", str(inc)]
    digest = hashlib.sha1()
    for p in (SOURCE, *HEADERS):
        digest.update(p.read_bytes())
    digest.update(" ".join([cxx, *flags]).encode())
    out_dir = _cache_dir()
    out = out_dir / f"gae_emulator_{variant}_{digest.hexdigest()[:12]}"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run(
        [cxx, *flags, str(SOURCE), "-o", str(tmp)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        msg = proc.stderr[-4000:]
        if variant != "plain" and ("sanitize" in msg or "asan" in msg or "tsan" in msg):
            raise Unavailable(f"{variant} runtime not available: {msg[-500:]}")
        raise RuntimeError(f"building the emulator failed:\n{msg}")
    tmp.replace(out)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    # Through a list, not .numpy(): numpy is not guaranteed on the GPU machine, and the
    # emulator only ever sees small inputs.
    return bytes(t.detach().cpu().contiguous().view(torch.uint8).tolist())


def emulate(
    exe: Path,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    offsets: torch.Tensor,
    coef_policy: torch.Tensor,
    coef_critic: torch.Tensor,
    gamma: float,
    skip_masked: bool,
    threads: int,
    misalign: bool = False,
    timeout: float = 600,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel contract through the emulator; returns (adv, ret) on the CPU."""
    dtype = rewards.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, s = rewards.numel(), offsets.numel() - 1
    header = struct.pack(
        "<qqiiiiid",
        n,
        s,
        DTYPE_CODES[dtype],
        int(skip_masked),
        int(mask is not None),
        threads,
        int(misalign),
        float(gamma),
    )
    parts = [header, _bytes(offsets.to(torch.int64)), _bytes(rewards), _bytes(values.to(dtype))]
    if mask is not None:
        parts.append(_bytes(mask.to(torch.bool)))
    parts += [_bytes(coef_policy.to(acc)), _bytes(coef_critic.to(acc))]
    with tempfile.TemporaryDirectory() as d:
        fin, fout = Path(d) / "in.bin", Path(d) / "out.bin"
        fin.write_bytes(b"".join(parts))
        proc = subprocess.run(
            [str(exe), str(fin), str(fout)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or "WARNING: ThreadSanitizer" in proc.stderr:
            raise AssertionError(f"emulator failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        out = torch.frombuffer(bytearray(fout.read_bytes()), dtype=acc)
    assert out.numel() == 2 * n
    return out[:n].clone(), out[n:].clone()


# --------------------------------------------------------------------------------------
# Inputs and the reference, shared by the host and GPU tests.


def make_case(
    lengths: list[int],
    dtype: torch.dtype = torch.float32,
    masked: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lam_policy: float | None = None,
    lam_critic: float = 1.0,
    gamma: float = 0.99,
) -> dict:
    """Kernel-contract inputs for ragged sequences of the given lengths.

    Random N(0, 1) rewards and values (never zeros), ~30% masked tokens plus one fully
    masked sequence when two or more are longer than 1, per-sequence random lambda_policy
    unless given.
    """
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    n, s = int(offsets[-1]), len(lengths)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rewards = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(n, generator=g) > 0.3
        long_ones = [i for i, length in enumerate(lengths) if length > 1]
        if len(long_ones) >= 2:  # one sequence entirely masked (never the only one)
            i = long_ones[len(long_ones) // 2]
            mask[offsets[i] : offsets[i + 1]] = False
    if lam_policy is None:
        lam_p = torch.rand(s, generator=g, dtype=torch.float64)
    else:
        lam_p = torch.full((s,), lam_policy, dtype=torch.float64)
    lam_c = torch.full((s,), lam_critic, dtype=torch.float64)
    case = {
        "rewards": rewards,
        "values": values,
        "mask": mask,
        "offsets": offsets,
        "coef_policy": (gamma * lam_p).to(acc),
        "coef_critic": (gamma * lam_c).to(acc),
        "gamma": gamma,
    }
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def reference(case: dict, skip_masked: bool, dtype: torch.dtype = torch.float64):
    """The spec (vapo_kernels.ops.gae.reference_kernel), computed in ``dtype``.

    float64: the exact answer for the rounded inputs. float32: what plain PyTorch gets
    in the kernel's accumulation dtype (the error budget's yardstick).
    """
    from vapo_kernels.ops.gae import reference_kernel

    # On the CPU: its per-token loop and per-sequence packing are launch-bound on a GPU.
    c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return reference_kernel(
        c["rewards"].to(dtype),
        c["values"].to(dtype),
        c["mask"],
        c["offsets"],
        c["coef_policy"].to(dtype),
        c["coef_critic"].to(dtype),
        c["gamma"],
        skip_masked,
    )


def check_close(got, case: dict, skip_masked: bool, k: float = 4.0) -> None:
    """Error budget: max|got - ref64| <= k * max|ref_acc - ref64| + a small floor.

    ref_acc is the reference run in the kernel's accumulation dtype; every element is
    compared (masked slots included: the spec defines them too).
    """
    acc = torch.float64 if case["rewards"].dtype == torch.float64 else torch.float32
    exact = reference(case, skip_masked, torch.float64)
    plain = reference(case, skip_masked, acc)
    for name, g, e, p in zip(("advantages", "returns"), got, exact, plain):
        assert g.dtype == acc, f"{name}: dtype {g.dtype}, expected {acc}"
        assert g.shape == e.shape
        g64 = g.to(torch.float64).cpu()
        e, p = e.cpu(), p.to(torch.float64).cpu()
        assert torch.isfinite(g64).all(), f"{name}: non-finite output (unwritten slot?)"
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        # float64 has no cheaper yardstick (ref_acc is ref64): a floor of ~500 ulps instead.
        floor = (2e-7 if acc == torch.float32 else 1e-13) * scale
        err = float((g64 - e).abs().max()) if e.numel() else 0.0
        budget = k * (float((p - e).abs().max()) if e.numel() else 0.0) + floor
        assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g}"


def _round_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def loop_reference(case: dict, skip_masked: bool, dtype: torch.dtype = torch.float64):
    """reference_padded transliterated to Python scalars, for sequences too long for the
    torch loop (one kernel launch per op per token). Each float32 operation is done in
    float64 and rounded once, which is exact float32 arithmetic for +, -, * (float64 has
    more than 2*24+2 bits). tests/test_gae_cuda_host.py checks it against reference_kernel.
    """
    rnd = _round_f32 if dtype == torch.float32 else float
    r = [rnd(x) for x in case["rewards"].double().cpu().tolist()]
    v = [rnd(x) for x in case["values"].double().cpu().tolist()]
    n = len(r)
    m = [True] * n if case["mask"] is None else case["mask"].cpu().tolist()
    offs = case["offsets"].cpu().tolist()
    cps = [rnd(x) for x in case["coef_policy"].double().cpu().tolist()]
    ccs = [rnd(x) for x in case["coef_critic"].double().cpu().tolist()]
    gamma = rnd(case["gamma"])
    adv, ret = [0.0] * n, [0.0] * n
    for s in range(len(offs) - 1):
        cp, cc = cps[s], ccs[s]
        next_value = adv_p = adv_c = 0.0
        for t in range(offs[s + 1] - 1, offs[s] - 1, -1):
            valid, rt, vt = m[t], r[t], v[t]
            if not skip_masked and not valid:
                rt = vt = 0.0
            delta = rnd(rnd(rt + rnd(gamma * next_value)) - vt)
            new_p = rnd(delta + rnd(cp * adv_p))
            new_c = rnd(delta + rnd(cc * adv_c))
            if valid or not skip_masked:
                adv_p, adv_c, next_value = new_p, new_c, vt
            adv[t] = adv_p
            ret[t] = rnd(adv_c + vt)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.tensor(adv, dtype=out), torch.tensor(ret, dtype=out)
