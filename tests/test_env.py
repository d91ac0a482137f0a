"""The package's environment variables: understood values work, anything else is an error
naming the variable (``VAPO_VALIDATE=off`` used to leave validation silently on)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vapo_kernels as vk
from vapo_kernels import _env


@pytest.mark.parametrize("value, want", [
    ("1", True), ("true", True), ("Yes", True), (" on ", True),
    ("0", False), ("FALSE", False), ("no", False), ("off", False), ("", None), (None, None),
])
def test_flag_values(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("VAPO_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("VAPO_TEST_FLAG", value)
    for default in (True, False):
        assert _env.flag("VAPO_TEST_FLAG", default) is (default if want is None else want)


@pytest.mark.parametrize("value", ["maybe", "2", "disabled"])
def test_a_flag_it_does_not_understand_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("VAPO_TEST_FLAG", value)
    with pytest.raises(ValueError, match=f"VAPO_TEST_FLAG='{value}'"):
        _env.flag("VAPO_TEST_FLAG", True)


def test_vapo_validate_is_read_at_import():
    code = "import vapo_kernels._ragged as r; print(r.validation_enabled())"
    for value, out in (("off", "False"), ("1", "True")):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"VAPO_VALIDATE": value, "PATH": ""}, check=False)
        assert run.stdout.strip() == out, run.stderr
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"VAPO_VALIDATE": "maybe", "PATH": ""}, check=False)
    assert run.returncode != 0 and "VAPO_VALIDATE='maybe'" in run.stderr


def test_an_unknown_vapo_backend_names_the_variable(monkeypatch):
    rewards, values = torch.rand(2, 4), torch.rand(2, 4)
    monkeypatch.setenv("VAPO_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="VAPO_BACKEND must be one of"):
        vk.gae(rewards, values, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="^backend must be one of"):  # the argument: named so
        vk.gae(rewards, values, gamma=1.0, lam=1.0, backend="nosuch")


@pytest.mark.parametrize("value", ["off", "0", 0, None])
def test_set_validation_takes_only_a_bool(value):
    # bool("off") is True: set_validation("off") turned the checks on (README review).
    was = vk._ragged.validation_enabled()
    with pytest.raises(TypeError, match=r"set_validation: enabled must be True or False"):
        vk.set_validation(value)
    assert vk._ragged.validation_enabled() == was


def test_vapo_no_cuda_is_checked_on_any_torch(monkeypatch):
    # With a CPU torch the value was never read, so VAPO_NO_CUDA=sure passed silently.
    from vapo_kernels import _backends

    monkeypatch.setenv("VAPO_NO_CUDA", "sure")
    with pytest.raises(ValueError, match="VAPO_NO_CUDA"):
        _backends._cuda_wanted()


@pytest.mark.parametrize("value", [None, "", "triton", "caf\u00e9", "a=b c"])
def test_value_reads_what_os_environ_holds_now(monkeypatch, value):
    # _env.value reads the bytes dict under os.environ (per op call, ~1 us cheaper than
    # os.environ.get): a change made at run time, as monkeypatch makes it, must show.
    if value is None:
        monkeypatch.delenv("VAPO_TEST_VALUE", raising=False)
    else:
        monkeypatch.setenv("VAPO_TEST_VALUE", value)
    assert _env.value("VAPO_TEST_VALUE") == value
    monkeypatch.setenv("VAPO_TEST_VALUE", "changed")
    assert _env.value("VAPO_TEST_VALUE") == "changed"


def test_vapo_backend_set_at_run_time_is_honoured(monkeypatch):
    # select caches its answer per (op, device, requested name): the name read from the
    # environment on each call is part of that key.
    x = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    monkeypatch.delenv("VAPO_BACKEND", raising=False)
    vk.gae(x, x, m, gamma=1.0, lam=0.95)
    monkeypatch.setenv("VAPO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VAPO_BACKEND"):
        vk.gae(x, x, m, gamma=1.0, lam=0.95)
