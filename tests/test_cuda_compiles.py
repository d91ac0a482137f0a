"""Every CUDA file compiles with nvcc for sm_90 on a machine without a GPU.

The .cu files include no torch headers (raw pointers + a launch function), so this
works with a CPU-only torch; the torch glue is compiled only by a CUDA build of torch.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from vapo_kernels._backends import csrc_dir

CU_FILES = sorted((csrc_dir() / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_file_compiles_for_sm90(source: Path, tmp_path):
    text = source.read_text()
    for banned in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/', '"c10/'):
        assert banned not in text, f"{source.name} includes a torch header ({banned})"
    cmd = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", str(source), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_there_is_cuda_code_to_compile():
    assert CU_FILES, "csrc/cuda has no .cu files"
