"""Shared pieces of the kernel-vs-reference tests: which backends to run, how many random
cases each gets, and the ragged batches every op family is checked on.

Backends come from the registry (``vk.available_backends(family, device)``), never from a
hand-written list: a backend that a family gains is tested by every parametrised test of
that family at once. CUDA devices are added (marked ``gpu``) when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

import vapo_kernels as vk


def backend_params(family: str) -> list:
    """pytest params ``(backend, device)``: every backend the registry reports for
    ``family`` on CPU (Triton there only through the interpreter), then every non-reference
    backend on CUDA when a GPU is present (marked ``gpu``)."""
    params = [pytest.param(b, "cpu", id=b) for b in vk.available_backends(family, "cpu")]
    if torch.cuda.is_available():
        params += [
            pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
            for b in vk.available_backends(family, "cuda")
            if b != "reference"
        ]
    return params


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU tensors: every lane runs in Python through the interpreter, ~100x
    slower than the other backends, so its tests take fewer and smaller cases."""
    return backend == "triton" and device == "cpu"


def repeats(backend: str, device: str, *, cpu: int, interpreted: int, reference: int | None = None) -> int:
    """How many cases a check runs under ``backend``: ``cpu``, but ``interpreted`` for
    Triton on CPU (the interpreter runs every lane in Python, ~100x slower than the rest)
    and ``reference`` (default ``cpu``) for the reference backend where the check's
    oracle is the reference itself in float64, so that its cases check the spec's own
    rounding in lower precision, not a second implementation."""
    if backend == "triton" and device == "cpu":  # as interpreted() (a parameter here)
        return interpreted
    if backend == "reference" and reference is not None:
        return reference
    return cpu


def examples(backend: str, device: str, *, cpu: int, interpreted: int, reference: int | None = None):
    """Hypothesis settings with :func:`repeats` random cases. Use on a ``@given``
    function defined inside the parametrised test."""
    count = repeats(backend, device, cpu=cpu, interpreted=interpreted, reference=reference)
    return settings(max_examples=count, deadline=None)


def kernel_of(op: str, backend: str, device: str):
    """The kernel ``backend`` registers for ``op`` (its kernel contract), as the registry
    selects it for tensors on ``device``. Fails where the backend has none of its own:
    a family's backend without a kernel for one of its ops would otherwise be tested
    through another backend's kernel."""
    from vapo_kernels import _backends

    name, fn = _backends.select(op, torch.device(device), backend)
    assert name == backend, f"backend {backend!r} has no {op} kernel (the registry picks {name!r})"
    return fn


def backend_cases(family: str, table: dict) -> list:
    """pytest params ``(backend, device, name)``: each backend of :func:`backend_params`
    with each entry ``name`` of ``table`` (``{name: {backend: expectation}}``) that says
    what that backend does - for checks whose expected outcome is backend-specific, such
    as the error a kernel's own argument checks raise."""
    params = []
    for p in backend_params(family):
        backend, device = p.values
        for name, per_backend in table.items():
            if backend in per_backend:
                params.append(pytest.param(backend, device, name, id=f"{p.id}-{name}", marks=p.marks))
    return params


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' compute and output dtype for inputs of ``dtype`` (the contract)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_compiled_matches_eager(fn, x: torch.Tensor) -> None:
    """``fn(x) -> (loss, metric)`` under ``torch.compile(fullgraph=True)`` gives the eager
    outputs and the eager gradient of the loss with respect to ``x``."""
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = fn(x_eager)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x_compiled)
    torch.testing.assert_close(compiled, eager)
    eager[0].backward()
    compiled[0].backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def rows_beyond_int32(vocab: int) -> torch.Tensor:
    """A (3, vocab) fp16 CPU view with a row stride of 2^30 + 64: row 2 starts 2^31 + 128
    elements into its 4 GiB buffer, past int32, although the stride itself fits. The
    buffer is only reserved: a test touching a few rows costs a few pages. Skips the test
    where that address space cannot be reserved."""
    stride = 2**30 + 64
    try:
        buf = torch.empty(2 * stride + vocab, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space")
    return buf.as_strided((3, vocab), (stride, 1))


def random_sequence_weights(
    num_seqs: int, gen: torch.Generator, some_zero: bool
) -> torch.Tensor:
    """Random float64 per-sequence aggregation weights in [0, 1); with ``some_zero`` about
    30% of them exactly 0 (sequences that must then contribute nothing)."""
    w = torch.rand(num_seqs, generator=gen, dtype=torch.float64)
    if some_zero:
        w = torch.where(torch.rand(num_seqs, generator=gen) < 0.3, 0.0, w)
    return w


def random_lm_weights(num_seqs: int, gen: torch.Generator) -> torch.Tensor:
    """Random float64 positive-example LM weights, about half of the sequences at 0 (not
    positive)."""
    w = torch.rand(num_seqs, generator=gen, dtype=torch.float64)
    return torch.where(torch.rand(num_seqs, generator=gen) < 0.5, 0.0, w)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern on CPU (so -0.0 != 0.0, and NaN == NaN of the same
    payload): ``torch.equal(bits(a), bits(b))`` is bit-for-bit equality."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().contiguous().view(ints[t.element_size()])


# --------------------------------------------------------------------------------------
# Ragged batches: sequence lengths, masks, layouts

# Values that masked or padded slots hold in the garbage tests: none of them may reach
# a valid output.
GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e38]

# Edge lengths: empty and single-token sequences, and the sides of 16- and 32-token chunks
# (the Triton tests run with 16-token chunks so that small rows cross chunk boundaries).
EDGE_LENGTHS = [0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 67]


def ragged_lengths(max_seqs: int = 6, max_len: int = 80):
    """Lists of at most ``max_seqs`` sequence lengths in [0, max_len] (maybe no sequence
    at all), the edge lengths up to ``max_len`` often."""
    edges = [n for n in EDGE_LENGTHS if n <= max_len]
    return st.lists(st.one_of(st.sampled_from(edges), st.integers(0, max_len)), max_size=max_seqs)


MASK_KINDS = ["none", "random", "turns", "long_turns", "mixed_rows"]


def make_mask(kind: str, length: int, gen: torch.Generator) -> torch.Tensor:
    """A bool mask of one sequence.

    ``none``: all valid. ``random``: ~60% valid. ``mixed_rows``: all valid, all masked or
    random, per sequence. ``turns``: alternating valid (model) and masked (tool output)
    spans of 1-8 tokens; ``long_turns``: spans up to 48 tokens, so whole chunks are masked.
    """
    if kind == "none":
        return torch.ones(length, dtype=torch.bool)
    if kind == "random":
        return torch.rand(length, generator=gen) < 0.6
    if kind == "mixed_rows":
        pick = int(torch.randint(0, 3, (1,), generator=gen))
        return [torch.ones(length), torch.zeros(length), torch.rand(length, generator=gen)][pick] > 0.4
    longest = 48 if kind == "long_turns" else 8
    mask = torch.zeros(length, dtype=torch.bool)
    t, valid = 0, bool(torch.rand(1, generator=gen) < 0.5)
    while t < length:
        span = int(torch.randint(1, longest + 1, (1,), generator=gen))
        mask[t : t + span] = valid
        t, valid = t + span, not valid
    return mask


def ragged_mask(kind: str, lengths: list[int], gen: torch.Generator) -> torch.Tensor:
    """The packed (N,) mask of sequences of ``lengths``."""
    return torch.cat([make_mask(kind, n, gen) for n in lengths] + [torch.zeros(0, dtype=torch.bool)])


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    """int32 offsets [0, l0, l0 + l1, ...] of the packed layout."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def to_padded(flat: torch.Tensor, cu: torch.Tensor, fill=0) -> torch.Tensor:
    """(N, ...) packed -> (B, T, ...) padded with ``fill``."""
    from vapo_kernels._ragged import pack_to_padded

    return pack_to_padded(flat, cu, fill)


def to_packed(padded: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) padded -> (N, ...) packed."""
    from vapo_kernels._ragged import padded_to_pack

    return padded_to_pack(padded, cu)
