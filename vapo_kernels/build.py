"""``python -m vapo_kernels.build``: compile (or find cached) the C++/CUDA extension now.

The extension is otherwise built on first use; running this once after install moves the
compile out of the first training step and prints any compiler error in full.
``--write-layout`` first rewrites ``csrc/cpu/loss_layout.h`` from ``_loss_layout.py``.
"""

import sys

from . import _backends, _loss_layout


def main() -> int:
    if "--write-layout" in sys.argv:
        # Regenerate the C++ copy of the loss kernels' vector layout (tests check it).
        header = _backends.csrc_dir() / "cpu" / "loss_layout.h"
        header.write_text(_loss_layout.cpp_header())
        print(f"vapo_kernels: wrote {header}")
    ext = _backends.extension(verbose="-v" in sys.argv)
    if ext is None:
        print(f"vapo_kernels: {_backends.extension_error()}", file=sys.stderr)
        return 1
    cuda = "with" if getattr(ext, "has_cuda", False) else "without"
    print(f"vapo_kernels: extension ready ({ext.__file__}), {cuda} CUDA kernels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
