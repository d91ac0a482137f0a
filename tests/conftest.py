"""Test-wide setup.

* Without a GPU, Triton kernels run through the interpreter on CPU tensors; the variable
  must be set before any ``@triton.jit`` function is defined, hence here.
* ``poison_outputs``: every uninitialised allocation (``torch.empty`` in Python and
  ``at::empty`` in C++) is filled with NaN, so an output element a kernel forgot to write
  shows up as NaN instead of passing by luck.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=False)
settings.load_profile("ci")


@contextlib.contextmanager
def _poisoned():
    was_det = torch.are_deterministic_algorithms_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


@pytest.fixture(scope="session")
def poisoned():
    """``with poisoned(): ...`` - session-scoped so hypothesis tests can use it per example."""
    return _poisoned


@pytest.fixture(scope="session")
def extension_built():
    """The C++ extension builds. Kernel modules use it: on CI a broken build must fail
    loudly, not silently drop the cpp backend or test only the fallback."""
    from vapo_kernels import _backends

    err = _backends.extension_error()
    assert err is None, err
