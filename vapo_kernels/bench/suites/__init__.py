"""The benchmark suites, by name. Each module defines ``SUITE`` (a harness ``Suite``)."""

from __future__ import annotations

import importlib

from ..harness import Suite

NAMES = ("gae", "logprobs", "loss")


def get(name: str) -> Suite:
    """The suite called ``name`` (imported on first use: a suite loads its peers)."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}").SUITE
