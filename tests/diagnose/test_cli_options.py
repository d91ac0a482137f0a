"""``vapo-diagnose`` as a new user meets it: defaults, help, trainer options in a
``--config`` file, refusals in one line, Ctrl-C."""

from __future__ import annotations

import pytest

from vapo_kernels.diagnose.cli import STUDIES, make_parser


@pytest.mark.parametrize("study", list(STUDIES))
def test_the_default_preset_is_quick(study):
    # --quick and --preset share a dest and argparse took --quick's default (None): every
    # study run without --preset crashed with KeyError: None after making its folder.
    parser = make_parser()
    assert parser.parse_args([study]).preset == "quick"
    assert parser.parse_args([study, "--quick"]).preset == "quick"
    assert parser.parse_args([study, "--preset", "tiny"]).preset == "tiny"
