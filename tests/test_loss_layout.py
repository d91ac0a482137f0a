"""The loss kernels' params / sums layout is defined once (vapo_kernels/_loss_layout.py).

The C++ kernels read a generated copy (csrc/cpu/loss_layout.h) and the Triton kernels the
module itself; these tests keep the copy current and the kernels' imports leaves.
"""

from __future__ import annotations

import ast
from pathlib import Path

from vapo_kernels import _loss_layout as layout
from vapo_kernels._backends import csrc_dir

TRITON_DIR = Path(layout.__file__).resolve().parent / "triton"


def test_cpp_header_is_generated_from_the_module():
    header = csrc_dir() / "cpu" / "loss_layout.h"
    assert header.read_text() == layout.cpp_header(), (
        f"{header} differs from vapo_kernels/_loss_layout.py: "
        "run `python -m vapo_kernels.build --write-layout` and commit the header"
    )


def test_slots_are_distinct_and_dense():
    # Each vector's slots are 0..NUM-1, each once: a duplicate would make two kernels'
    # outputs share a slot, a gap would leave an unwritten one.
    consts = layout.constants()
    for prefix, count in (("P_", layout.NUM_PARAMS), ("S_", layout.NUM_SUMS)):
        slots = sorted(v for k, v in consts.items() if k.startswith(prefix))
        assert slots == list(range(count)), f"{prefix}* slots: {slots}"


def test_kl_codes_are_the_kernels_kinds():
    # The kernels switch on 1 (k1), 2 (abs), 3 (k2), 4 (k3); 0 means off.
    assert set(layout.KL_CODES.values()) == {1, 2, 3, 4}
    assert layout.KL_CODES["k1"] == 1 and layout.KL_CODES["k3"] == 4


def test_layout_module_is_a_leaf():
    tree = ast.parse(Path(layout.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)


def test_triton_kernels_do_not_import_the_op_layer():
    # Kernels are leaves: the ops import them, never the reverse (an ops module that
    # imports a kernel module at load time would otherwise make an import cycle).
    for path in sorted(TRITON_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and node.module is None:  # from .. import x
                    names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not (name == "ops" or name.startswith(("ops.", "vapo_kernels.ops"))), (
                    f"{path.name}:{node.lineno} imports {name!r} from the op layer"
                )
