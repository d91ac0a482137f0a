"""The package's on/off environment variables, read in one place: a value it does not
understand is an error naming the variable, never silently the default (before,
``VAPO_VALIDATE=off`` left validation on and ``VAPO_NO_EXTENSION=true`` built the
extension)."""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag(name: str, default: bool) -> bool:
    """The switch ``name``: unset or empty gives ``default``."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 1 or 0 (also "
                     "true/false, yes/no, on/off)")


# os.environ.get encodes the name and decodes the value on every call (~1 us, read on
# every op call for VAPO_BACKEND); on POSIX the bytes dict under os.environ holds the same
# data (os.environ writes go through to it) and answers in ~0.05 us. Looked up on each
# call: a test may replace os.environ itself.


def value(name: str) -> str | None:
    """``os.environ.get(name)``, cheaply (called per op call)."""
    data = getattr(os.environ, "_data", None) if os.name == "posix" else None
    if type(data) is not dict:
        return os.environ.get(name)
    raw = data.get(name.encode())
    return None if raw is None else os.fsdecode(raw)
