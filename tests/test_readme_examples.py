"""The README's Python examples run as written, in order (a new user copies them; two of
them failed when a review ran them: a name meaning token ids in one line and value
targets in the next, and a `...` standing for arguments)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_python_examples_run_in_order():
    blocks = python_blocks()
    assert len(blocks) >= 5 and blocks[0].startswith("import torch")
    scope: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), scope)
        except Exception as error:  # name the block: the traceback points into exec
            raise AssertionError(f"README python block {i + 1} fails:\n{block}") from error
    # The last block ran the whole chain: a finite loss with the metrics it names.
    assert scope["loss"].isfinite() and "rollout_is_masked_frac" in scope["m"]
