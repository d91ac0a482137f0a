"""The JIT build of the C++ extension: its cache key and what it says while it compiles."""

import io
import shutil
import time

from vapo_kernels import _backends


def _copy_csrc(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(_backends.csrc_dir(), src)
    return src


def _key(src, monkeypatch, flags=("-O3",)):
    monkeypatch.setattr(_backends, "csrc_dir", lambda: src)
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    return _backends._build_key(sources, list(flags))


def test_build_key_follows_content_not_names(tmp_path, monkeypatch):
    src = _copy_csrc(tmp_path)
    base = _key(src, monkeypatch)
    assert base == _key(src, monkeypatch), "the key must be deterministic"
    # A header edit (not only a .cpp edit) changes the binary, so it changes the key.
    header = src / "cpu" / "simd.h"
    header.write_text(header.read_text() + "\n// edited\n")
    edited = _key(src, monkeypatch)
    assert edited != base
    # Flags and the torch version are part of it too.
    assert _key(src, monkeypatch, flags=("-O2",)) != edited
    monkeypatch.setattr(_backends.torch, "__version__", "0.0.0-other")
    assert _key(src, monkeypatch) != edited


def test_build_key_differs_between_checkouts(tmp_path, monkeypatch):
    # Same content in two folders: ninja would rebuild each time the other one built,
    # since its compile commands name the source paths.
    a, b = (tmp_path / "a", tmp_path / "b")
    a.mkdir(), b.mkdir()
    assert _key(_copy_csrc(a), monkeypatch) != _key(_copy_csrc(b), monkeypatch)


def test_build_progress_reports_each_file_in_a_log(tmp_path, monkeypatch):
    out = io.StringIO()  # not a terminal: one line per compiled file, no bar
    sources = [tmp_path / f"{n}.cpp" for n in ("a", "b")]
    progress = _backends._BuildProgress(tmp_path, "ext", sources, quiet=False)
    progress.out = out
    with progress:
        for name in ("a.o", "b.o", "ext.so"):
            (tmp_path / name).write_bytes(b"")
            time.sleep(0.7)  # the watcher polls every 0.5 s
    text = out.getvalue()
    assert "compiling the C++ kernels (2 files" in text
    assert "compiled 3/3" in text and "compiled in" in text


def test_build_progress_is_silent_when_cached(tmp_path):
    (tmp_path / "ext.so").write_bytes(b"")
    progress = _backends._BuildProgress(tmp_path, "ext", [tmp_path / "a.cpp"], quiet=False)
    progress.out = io.StringIO()
    with progress:
        pass
    assert progress.out.getvalue() == ""


def test_cuda_kernels_need_a_gpu_or_an_architecture_list(monkeypatch):
    """A CUDA torch with nvcc but no GPU and no TORCH_CUDA_ARCH_LIST (pip's default torch
    on a CPU box): torch's build would fail on the empty architecture list and take the
    C++ CPU kernels down with it, so the CUDA kernels are left out instead."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VAPO_NO_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert not _backends._cuda_wanted()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _backends._cuda_wanted()
    assert _backends._cuda_archs() == "9.0"
    monkeypatch.setenv("VAPO_NO_CUDA", "1")
    assert not _backends._cuda_wanted()
    monkeypatch.delenv("VAPO_NO_CUDA")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _backends._cuda_wanted()
