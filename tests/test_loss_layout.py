"""The loss kernels' params / sums layout is defined once (vapo_kernels/_loss_layout.py).

The C++ kernels read a generated copy (csrc/cpu/loss_layout.h) and the Triton kernels the
module itself; these tests keep the copy current and the kernels' imports leaves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

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
    # Kernels import it: it may import torch and the package's other leaf (the device
    # cache, which imports only torch), nothing else.
    tree = ast.parse(Path(layout.__file__).read_text())
    imported = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            imported |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            imported |= {f"{'.' * n.level}{n.module or a.name}" for a in n.names}
    assert imported <= {"__future__", "torch", "._device_cache"}, imported
    cache = ast.parse((Path(layout.__file__).parent / "_device_cache.py").read_text())
    cache_imports = {a.name for n in ast.walk(cache) if isinstance(n, (ast.Import, ast.ImportFrom))
                     for a in n.names}
    assert cache_imports <= {"annotations", "functools", "torch"}, cache_imports


def test_loss_is_the_terms_times_their_coefficients():
    params = [0.0] * layout.NUM_PARAMS
    params[layout.P_VF_COEF], params[layout.P_KL_COEF] = 0.5, 0.25
    params[layout.P_ENTROPY_COEF], params[layout.P_LM_COEF] = 0.125, 2.0
    sums = torch.arange(1.0, layout.NUM_SUMS + 1, dtype=torch.float64)
    want = 1.0 * 1 + 0.5 * 2 + 0.25 * 3 - 0.125 * 4 + 2.0 * 5  # the metric slots never enter
    assert layout.loss_total(sums, params).item() == want
    assert layout.loss_total(sums.float(), params).dtype == torch.float32


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
