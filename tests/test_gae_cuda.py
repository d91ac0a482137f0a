"""The CUDA C++ GAE kernel (csrc/cuda) on a real GPU, against the float64 spec.

Skipped without a CUDA device or when the extension was built without CUDA kernels.
Accuracy uses an error budget: the kernel's max error against the float64 reference may
be at most a few times that of the same reference run in the kernel's accumulation dtype
(see tests/cuda_host/harness.py::check_close). Every output element is compared, masked
slots included, and every allocation starts as NaN (the ``poisoned`` fixture of
tests/conftest.py), so a slot the kernel fails to write cannot pass.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gae_cuda_harness", Path(__file__).parent / "cuda_host" / "harness.py"
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MODES = [("skip", True, True), ("zero", False, True), ("nomask", True, False)]


@pytest.fixture(scope="module")
def ext():
    # Checked in this order so that a CPU-only machine skips without building anything.
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from vapo_kernels import _backends

    err = _backends.extension_error()
    if err:
        pytest.skip(err)
    if not getattr(_backends.extension(), "has_cuda", False):
        pytest.skip("the extension was built without CUDA kernels")
    return _backends.extension()


@pytest.fixture(autouse=True)
def _nan_filled_allocations(poisoned):
    """Every at::empty (the kernel's outputs included) starts as NaN (tests/conftest.py):
    with every element compared, an unwritten output cannot pass."""
    with poisoned():
        yield


@pytest.fixture
def threads(monkeypatch):
    """Sets the block size of the next launches (VAPO_GAE_CUDA_THREADS)."""

    def set_threads(t: int | None):
        if t is None:
            monkeypatch.delenv("VAPO_GAE_CUDA_THREADS", raising=False)
        else:
            monkeypatch.setenv("VAPO_GAE_CUDA_THREADS", str(t))

    return set_threads


def _items(dtype):
    return 4 if dtype == torch.float64 else 8


def _call(ext, case, skip):
    return ext.gae_scan_cuda(
        case["rewards"],
        case["values"],
        case["mask"],
        case["offsets"],
        case["coef_policy"],
        case["coef_critic"],
        case["gamma"],
        skip,
    )


def _lengths(threads: int, dtype) -> list[int]:
    chunk = min(threads, 512 if dtype == torch.float64 else 1024) * _items(dtype)
    return [0, 1, 2, 7, 8, 9, chunk - 1, chunk, chunk + 1, 0, 2 * chunk + 5, 1, 3, 3 * chunk - 2]


# --------------------------------------------------------------------------------------
# Through the public API (the torch op, validation, padded and packed layouts).


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode_name", ["skip", "zero"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_decoupled_gae_packed(ext, dtype, mode_name, masked):
    import vapo_kernels

    lengths = [0, 1, 2, 3, 17, 256, 2047, 2048, 2049, 5000, 0, 1, 12345]
    case = H.make_case(lengths, dtype, masked, seed=1, device="cuda")
    # Per-sequence lambda_policy as a tensor; the op rounds gamma*lambda as make_case does.
    g = torch.Generator().manual_seed(2)
    lam_p = torch.rand(len(lengths), dtype=torch.float64, generator=g).cuda()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    case["coef_policy"] = (case["gamma"] * lam_p).to(acc)
    cu = case["offsets"].to(torch.int32)
    adv, ret = vapo_kernels.decoupled_gae(
        case["rewards"],
        case["values"],
        case["mask"],
        cu,
        gamma=case["gamma"],
        lam_critic=1.0,
        lam_policy=lam_p,
        mask_mode=mode_name,
        backend="cuda",
    )
    H.check_close((adv, ret), case, mode_name == "skip")


def _within_budget(got, exact, plain):
    """max|got - exact| <= 4 max|plain - exact| + 2e-7 max|exact| (see harness.check_close)."""
    for a, e, p in zip(got, exact, plain):
        a, e, p = a.double().cpu(), e.double().cpu(), p.double().cpu()
        assert torch.isfinite(a).all()
        err = (a - e).abs().max().item()
        budget = 4 * (p - e).abs().max().item() + 2e-7 * max(1.0, e.abs().max().item())
        assert err <= budget, f"max error {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("mode_name", ["skip", "zero"])
def test_gae_padded_and_length_adaptive(ext, mode_name):
    import vapo_kernels

    g = torch.Generator(device="cuda").manual_seed(3)
    r = torch.randn(6, 3001, device="cuda", generator=g)
    v = torch.randn(6, 3001, device="cuda", generator=g)
    m = torch.rand(6, 3001, device="cuda", generator=g) > 0.2
    m[2] = False
    variants = [{"lam": 0.95}, {"lam": torch.rand(6, device="cuda", generator=g)}]
    for fn, kw in [(vapo_kernels.gae, k) for k in variants] + [
        (vapo_kernels.decoupled_gae, {"alpha": 0.05})
    ]:
        common = {"gamma": 0.99, "mask_mode": mode_name, **kw}
        got = fn(r, v, m, backend="cuda", **common)
        exact = fn(r.double(), v.double(), m, backend="reference", **common)
        plain = fn(r, v, m, backend="reference", **common)
        _within_budget(got, exact, plain)


def test_opcheck(ext):
    import vapo_kernels  # noqa: F401  registers torch.ops.vapo.gae

    case = H.make_case([5, 0, 300], torch.float32, True, seed=4, device="cuda")
    lam = torch.full((3,), 0.9, dtype=torch.float64, device="cuda")
    args = (
        case["rewards"],
        case["values"],
        case["mask"],
        case["offsets"],
        lam,
        lam,
        0.0,
        0.0,
        0.99,
        0.0,
        "skip",
        "cuda",
    )
    torch.library.opcheck(torch.ops.vapo.gae.default, args)


# --------------------------------------------------------------------------------------
# The kernel contract directly: block sizes, dtypes, alignment, edges.


@pytest.mark.parametrize("block", [32, 64, 96, 160, 256, 512, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_block_sizes(ext, threads, block, dtype, mode):
    _, skip, masked = mode
    threads(block)
    case = H.make_case(_lengths(block, dtype), dtype, masked, seed=block, device="cuda")
    H.check_close(_call(ext, case, skip), case, skip)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_unaligned_inputs(ext, threads, dtype, mode):
    """Slices one element into a buffer: the scalar-access path of the kernel."""
    _, skip, masked = mode
    threads(64)
    case = H.make_case(_lengths(64, dtype), dtype, masked, seed=8, device="cuda")
    shifted = dict(case)
    for key in ("rewards", "values", "mask"):
        if case[key] is not None:
            buf = torch.empty(case[key].numel() + 1, dtype=case[key].dtype, device="cuda")
            buf[1:] = case[key]
            shifted[key] = buf[1:]
    assert shifted["rewards"].data_ptr() % 16 != 0
    got = _call(ext, shifted, skip)
    H.check_close(got, case, skip)
    aligned = _call(ext, case, skip)  # same arithmetic, other access path: same bits
    assert torch.equal(got[0], aligned[0]) and torch.equal(got[1], aligned[1])


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_garbage_leaves_outputs_bit_identical(ext, skip, dtype):
    case = H.make_case([0, 1, 9, 4000, 2048, 70000, 3], dtype, True, seed=5, device="cuda")
    clean = _call(ext, case, skip)
    m = case["mask"]
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38], device="cuda")
    idx = torch.arange(m.numel(), device="cuda") % junk.numel()
    dirty = dict(case)
    for key in ("rewards", "values"):
        x = case[key].clone()
        x[~m] = junk[idx[~m]].to(dtype)
        dirty[key] = x
    got = _call(ext, dirty, skip)
    assert torch.equal(clean[0], got[0])
    if skip:  # returns = A + raw V_t: only a masked slot's own return sees its garbage
        assert torch.equal(clean[1][m], got[1][m])
    else:
        assert torch.equal(clean[1], got[1])


def test_outputs_over_nan_memory(ext, monkeypatch):
    """Also without the deterministic fill: outputs allocated over freed NaN-filled blocks
    of the caching allocator keep a NaN wherever the kernel does not write."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    case = H.make_case([0, 1, 77, 1025, 4096, 0, 3], torch.float32, True, seed=6, device="cuda")
    n = case["rewards"].numel()
    for _ in range(2):
        poison = [torch.full((n,), float("nan"), device="cuda") for _ in range(8)]
        del poison
        got = _call(ext, case, True)
        H.check_close(got, case, True)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_many_sequences_beyond_grid_y_limit(ext, mode):
    """70,000 short sequences: a 1-D grid with more blocks than gridDim.y/z allow."""
    _, skip, masked = mode
    g = torch.Generator().manual_seed(9)
    lengths = torch.randint(0, 25, (70_000,), generator=g).tolist()
    case = H.make_case(lengths, torch.float32, masked, seed=9, device="cuda")
    H.check_close(_call(ext, case, skip), case, skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_512_by_16k(ext, dtype, mode):
    _, skip, masked = mode
    case = H.make_case([16384] * 512, dtype, masked, seed=10, device="cuda", lam_policy=0.95)
    H.check_close(_call(ext, case, skip), case, skip)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_single_128k_sequence(ext, mode):
    """131,075 tokens in one sequence (one block walking 16+ chunks); the reference is the
    scalar loop (checked equal to reference_kernel in test_gae_cuda_host.py)."""
    _, skip, masked = mode
    case = H.make_case(
        [131_075],
        torch.float32,
        masked,
        seed=12,
        device="cuda",
        lam_policy=0.95,
        lam_critic=1.0,
        gamma=1.0,
    )
    if masked:  # make_case never masks the only sequence entirely
        assert bool(case["mask"].any())
    got = _call(ext, case, skip)
    exact = H.loop_reference(case, skip, torch.float64)
    plain = H.loop_reference(case, skip, torch.float32)
    _within_budget(got, exact, plain)


def test_runs_on_the_current_stream(ext):
    case = H.make_case([5000, 3, 0, 20000], torch.float32, True, seed=14, device="cuda")
    want = _call(ext, case, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _call(ext, case, True)
    side.synchronize()
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_rejects_bad_inputs(ext):
    case = H.make_case([10, 5], torch.float32, True, seed=15, device="cuda")
    bad = dict(case, rewards=case["rewards"].cpu())
    with pytest.raises(RuntimeError, match="CUDA|device"):
        _call(ext, bad, True)
    bad = dict(case, values=case["values"].double())
    with pytest.raises(RuntimeError, match="same dtype"):
        _call(ext, bad, True)
    bad = dict(case, mask=case["mask"].to(torch.uint8))
    with pytest.raises(RuntimeError, match="bool"):
        _call(ext, bad, True)
    bad = dict(case, coef_policy=case["coef_policy"].double())
    with pytest.raises(RuntimeError, match="coefficients"):
        _call(ext, bad, True)
    bad = dict(case, rewards=torch.randn(30, device="cuda")[::2])
    with pytest.raises(RuntimeError, match="contiguous"):
        _call(ext, bad, True)


# --------------------------------------------------------------------------------------
# The GPU against the host emulator of the same block code: bit for bit.


_EMULATED = [(d, b) for d in DTYPES for b in (32, 96)] + [(torch.float32, 1024)]


@pytest.mark.parametrize("dtype,block", _EMULATED, ids=lambda x: str(x))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_bitwise_equal_to_host_emulator(ext, threads, dtype, block, mode):
    """gae_scan_block.cuh writes every rounding step explicitly (fma / non-contractible
    mul/add), so the GPU and the emulator of tests/test_gae_cuda_host.py must agree to
    the bit. A difference means the device code is not the code the host tests check."""
    try:
        exe = H.build("plain")
    except H.Unavailable as e:
        pytest.skip(str(e))
    _, skip, masked = mode
    threads(block)
    lengths = [0, 1, 9, 3 * min(block, 512) * _items(dtype) + 5, 2, 700]
    case = H.make_case(lengths, dtype, masked, seed=16, device="cuda")
    got = _call(ext, case, skip)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    want = H.emulate(
        exe,
        cpu["rewards"],
        cpu["values"],
        cpu["mask"],
        cpu["offsets"],
        cpu["coef_policy"],
        cpu["coef_critic"],
        cpu["gamma"],
        skip,
        block,
    )
    assert torch.equal(got[0].cpu(), want[0]), "advantages differ from the emulator"
    assert torch.equal(got[1].cpu(), want[1]), "returns differ from the emulator"


def test_default_block_size_is_used(ext, threads):
    """No override: the launcher's heuristic (gae_scan_default_threads) picks the size."""
    threads(None)
    assert "VAPO_GAE_CUDA_THREADS" not in os.environ
    case = H.make_case([16384] * 8 + [3, 0], torch.float32, True, seed=17, device="cuda")
    H.check_close(_call(ext, case, True), case, True)
