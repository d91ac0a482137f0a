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
