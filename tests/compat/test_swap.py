"""patch() where the peer is installed without one of its own dependencies (a peer
installed with --no-deps): one clear ImportError naming the missing module, not a
ModuleNotFoundError from deep inside the peer."""

from __future__ import annotations

import sys

import pytest

from vapo_kernels.compat import _Swap


def test_a_peer_missing_one_of_its_dependencies_is_named(tmp_path, monkeypatch):
    package = tmp_path / "fakepeer_for_swap"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text("import missing_dep_of_fakepeer\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    swap = _Swap("fakepeer_for_swap", "fakepeer_for_swap.utils", "f", lambda: None)
    try:
        with pytest.raises(ImportError, match=r"^patch\(\): importing fakepeer_for_swap.utils "
                           r"needs 'missing_dep_of_fakepeer', a dependency of fakepeer_for_swap"):
            swap.apply()
        assert not swap.active
        # The peer itself missing stays Python's own error, naming the peer.
        with pytest.raises(ModuleNotFoundError, match="no_such_peer"):
            _Swap("no_such_peer", "no_such_peer.utils", "f", lambda: None).apply()
    finally:
        for name in [m for m in sys.modules if m.startswith("fakepeer_for_swap")]:
            del sys.modules[name]
