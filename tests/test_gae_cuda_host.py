"""The CUDA GAE kernel's logic, checked on a machine without a GPU.

csrc/cuda/gae_scan_block.cuh holds the whole block algorithm of the kernel as
__host__ __device__ code templated on an execution context. tests/cuda_host/gae_emulator.cpp
runs that same code on the host, one std::thread per CUDA thread, with warp shuffles and
__syncthreads emulated by std::barrier. These tests hold the emulator against the spec
(vapo_kernels.ops.gae.reference_kernel), under AddressSanitizer/UBSan and ThreadSanitizer.

Verified here: scan order and combine operators, chunk carries, sequence edges inside
groups, idle threads, 1..32 warps per block, aligned (vector) and unaligned (scalar)
access paths, every storage dtype's conversion, both mask modes, masked-slot garbage,
no out-of-bounds access, no shared-memory race, no read of unwritten shared memory.
Not verified here (tests/test_gae_cuda.py does it on a GPU): nvcc's device code, the
real shuffle/barrier hardware, the torch glue at run time, and speed. The glue is
syntax-checked against torch's headers below when a compiler and the CUDA headers exist.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gae_cuda_harness", Path(__file__).parent / "cuda_host" / "harness.py"
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MODES = [("skip", True, True), ("zero", False, True), ("nomask", True, False)]


def _exe(variant: str) -> Path:
    try:
        return H.build(variant)
    except H.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def emulator() -> Path:
    """The ASan/UBSan build when this toolchain has it, else the plain one."""
    try:
        return H.build("asan")
    except H.Unavailable:
        return _exe("plain")


def _items(dtype):
    return 4 if dtype == torch.float64 else 8


def _lengths(threads: int, dtype) -> list[int]:
    """Edges of groups and chunks for this block size, empty and length-1 sequences."""
    chunk = threads * _items(dtype)
    return [0, 1, 2, 7, 8, 9, chunk - 1, chunk, chunk + 1, 0, 2 * chunk + 5, 1, 3, 3 * chunk - 2]


def _run(exe, case, skip, threads, misalign=False):
    return H.emulate(
        exe,
        case["rewards"],
        case["values"],
        case["mask"],
        case["offsets"],
        case["coef_policy"],
        case["coef_critic"],
        case["gamma"],
        skip,
        threads,
        misalign,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("threads,misalign", [(32, False), (64, True), (96, False)])
def test_matches_reference(emulator, dtype, mode, threads, misalign):
    _, skip, masked = mode
    case = H.make_case(_lengths(threads, dtype), dtype, masked, seed=threads)
    got = _run(emulator, case, skip, threads, misalign)
    H.check_close(got, case, skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_32_warps(emulator, dtype, mode):
    """1024 threads (float64: capped at 512): the warp-0 combine of a full warp of totals."""
    _, skip, masked = mode
    chunk = 1024 * _items(dtype)
    case = H.make_case([chunk + 37, 5, 0, 2 * chunk], dtype, masked, seed=7)
    H.check_close(_run(emulator, case, skip, 1024), case, skip)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("threads", [32, 96, 256])
def test_integer_data_is_exact(emulator, mode, threads):
    """gamma = lambda = 1 (or lambda_policy = 0) on small integers: every operation is exact
    in float32, so any carry or ordering mistake shows as a difference, not as noise."""
    _, skip, masked = mode
    case = H.make_case(
        _lengths(threads, torch.float32),
        torch.float32,
        masked,
        seed=3,
        lam_policy=0.0,
        lam_critic=1.0,
        gamma=1.0,
    )
    g = torch.Generator().manual_seed(11)
    n = case["rewards"].numel()
    case["rewards"] = torch.randint(-8, 9, (n,), generator=g).to(torch.float32)
    case["values"] = torch.randint(-8, 9, (n,), generator=g).to(torch.float32)
    adv, ret = _run(emulator, case, skip, threads)
    adv64, ret64 = H.reference(case, skip, torch.float64)
    assert torch.equal(adv.double(), adv64)
    assert torch.equal(ret.double(), ret64)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_garbage_leaves_outputs_bit_identical(emulator, skip, dtype):
    threads = 64
    case = H.make_case(_lengths(threads, dtype), dtype, True, seed=5)
    clean = _run(emulator, case, skip, threads)
    m = case["mask"]
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38])
    idx = torch.arange(m.numel()) % junk.numel()
    dirty_case = dict(case)
    for key in ("rewards", "values"):
        x = case[key].clone()
        x[~m] = junk[idx[~m]].to(dtype)
        dirty_case[key] = x
    dirty = _run(emulator, dirty_case, skip, threads)
    assert torch.equal(clean[0], dirty[0]), "advantages changed"
    if skip:  # verl: returns = A + raw V_t, so a masked slot's own return sees its V_t
        assert torch.equal(clean[1][m], dirty[1][m]), "returns of valid tokens changed"
    else:  # zero mode: V and r are 0 on masked tokens, so every output is unchanged
        assert torch.equal(clean[1], dirty[1]), "returns changed"


def test_single_group_sequences(emulator):
    """Sequences that start and end inside one group (both edges on the scalar path)."""
    case = H.make_case([3, 2, 1, 4, 5, 6, 1, 2, 9, 0, 7], torch.float32, True, seed=9)
    for skip in (True, False):
        H.check_close(_run(emulator, case, skip, 32), case, skip)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
def test_no_shared_memory_race(skip):
    """ThreadSanitizer over 3 warps and several chunks: every shared-memory access is
    ordered by a barrier (the chunk loop has no barrier of its own; see block_enter)."""
    exe = _exe("tsan")
    case = H.make_case([3 * 96 * 8 + 13, 40, 0, 1], torch.float32, True, seed=13)
    H.check_close(_run(exe, case, skip, 96), case, skip)


# --------------------------------------------------------------------------------------
# Build checks that need only the tools, not a GPU (nvcc compiling the .cu files is
# tests/test_cuda_compiles.py).

REPO = Path(__file__).resolve().parent.parent


def test_glue_syntax_against_torch_headers(tmp_path):
    """g++ -fsyntax-only of the torch glue with -DVAPO_WITH_CUDA. A CPU wheel of torch ships
    the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h; a stub
    stands in for it here (a CUDA build of torch has the real one)."""
    from torch.utils import cpp_extension

    cxx, inc = H.compiler(), H.cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers")
    torch_inc = [Path(p) for p in cpp_extension.include_paths()]
    if not (torch_inc[0] / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (torch_inc[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    args = [
        cxx,
        "-fsyntax-only",
        "-std=c++17",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DVAPO_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=vapo_syntax_check",
        f"-I{REPO / 'csrc'}",
    ]
    for p in [*torch_inc, Path(sysconfig.get_paths()["include"]), inc, tmp_path]:
        args += ["-isystem", str(p)]
    # gae_cuda.cpp defines vapo::gae_scan_cuda by its qualified name, so this also checks
    # the definition against the declaration in ops.h that ops.cpp binds.
    proc = subprocess.run(
        [*args, str(REPO / "csrc" / "cuda" / "gae_cuda.cpp")],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_loop_reference_is_the_spec(dtype, mode):
    """The scalar loop the GPU tests use for 128k-token sequences equals reference_kernel
    bit for bit (float32 and float64), including masked slots and empty sequences."""
    _, skip, masked = mode
    case = H.make_case([0, 1, 5, 300, 0, 77], torch.float32, masked, seed=21)
    for got, want in zip(H.loop_reference(case, skip, dtype), H.reference(case, skip, dtype)):
        assert torch.equal(got, want)
