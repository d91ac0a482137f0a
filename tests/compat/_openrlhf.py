"""Import real OpenRLHF modules on a CPU machine, without its GPU stack.

Package ``__init__``s are replaced by bare packages over the real folders (so the real
submodule files load) and GPU-only imports by stubs. On exit every stub and everything
imported under them leaves ``sys.modules`` again, so later imports (transformers probes
deepspeed; OpenRLHF imports flash-attn at call time) see the real environment.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

HEAVY = [
    "deepspeed", "flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
    "flash_attn.utils.distributed", "peft", "peft.tuners", "peft.tuners.lora", "vllm",
]


class _Stub(types.ModuleType):
    """Any attribute is another stub: enough for import-time ``from x import y``."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return self


@contextlib.contextmanager
def openrlhf_without_gpu_stack(packages: list[str], extra: dict[str, types.ModuleType] = ()):
    """Within the block, ``packages`` are bare packages over OpenRLHF's folders, HEAVY
    modules are stubs, and ``extra`` maps further module names to stand-ins."""
    root = Path(importlib.util.find_spec("openrlhf").origin).parent
    saved = dict(sys.modules)
    try:
        for name in packages:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = pkg
        for name in HEAVY:
            stub = _Stub(name)
            stub.__path__ = []
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = stub
        sys.modules.update(dict(extra))
        yield
    finally:
        tops = {"openrlhf"} | {n.split(".")[0] for n in HEAVY}
        for name in list(sys.modules):
            if name not in saved and name.split(".")[0] in tops:
                del sys.modules[name]
        for name in [*packages, *HEAVY, *dict(extra)]:
            if name in saved:
                sys.modules[name] = saved[name]
