"""The Triton kernels compile for a real GPU (sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the other tests run on CPU) executes the kernels
as Python, so it never runs Triton's code generator: a construct it rejects - a global
that is not a constexpr, a module attribute it cannot fold (the kernels index params /
sums by ``_loss_layout`` names) - would only show up on a GPU. ``triton.compile`` for a
CUDA target needs no device; it runs in a subprocess because the interpreter setting is
read when the kernels are defined.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vapo_kernels.triton import loss as T

    # Pointer element types by argument name; other pointers are float, scalars int64.
    POINTERS = {"m_ptr": "*i1", "valid_ptr": "*i1", "offs_ptr": "*i64", "span_ptr": "*i64",
                "y_ptr": "*i64"}

    def compile_for_sm90(kernel, constexprs, acc, num_warps, pointers=None, num_stages=3):
        signature, values = {}, {}
        for i, p in enumerate(kernel.params):
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                values[(i,)] = acc if p.name == "ACC" else constexprs[p.name]
            elif p.name.endswith("_ptr"):
                signature[p.name] = {**POINTERS, **(pointers or {})}.get(
                    p.name, "*fp64" if acc == tl.float64 else "*fp32")
            else:
                signature[p.name] = "i64"
        src = ASTSource(kernel, signature, constexprs=values)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages})
        assert "st.global" in out.asm["ptx"], kernel
        return out

    token = dict(HAS_LOGP=True, HAS_POLICY=True, HAS_ISW=True, HAS_DUAL=True, VALUE_MODE=2,
                 KL_KIND=4, KL_STRAIGHT=False, HAS_ENTROPY=True, HAS_LM=True, HAS_MASK=True,
                 NEED_GRAD=True, BLOCK=T.GPU_BLOCK)
    logits = dict(HAS_ISW=True, HAS_DUAL=True, KL_KIND=4, KL_STRAIGHT=True, HAS_LM=True,
                  HAS_GH=True, NEED_GRAD=True, BLOCK_V=T.LOGITS_GPU_BLOCK_V)
    """
)

LOSS_KERNELS = """
for acc in (tl.float32, tl.float64):  # _expm1_minus_x has a float64 branch
    compile_for_sm90(T._token_loss_kernel, token, acc, T.GPU_NUM_WARPS)
    compile_for_sm90(T._logits_loss_kernel, logits, acc, 16)
print("compiled")
"""

# HAS_ISW codes of the rollout correction: 2 token / truncate, 3 token / mask, 4 sequence /
# truncate, 7 geometric / mask: each branch of _rollout in each kernel, in float32 or float64.
ROLLOUT_VARIANTS = """
for acc, token_codes, logits_codes, geometric in (
    (tl.float32, (3, 7), (2, 4), False), (tl.float64, (4,), (7,), True),
):
    for code in token_codes:
        compile_for_sm90(T._token_loss_kernel, dict(token, HAS_ISW=code), acc, T.GPU_NUM_WARPS)
    for code in logits_codes:
        compile_for_sm90(T._logits_loss_kernel, dict(logits, HAS_ISW=code), acc, 16)
    compile_for_sm90(T._rollout_sequence_kernel,
                     dict(GEOMETRIC=geometric, HAS_MASK=True, BLOCK=T.GPU_BLOCK), acc, 8)
print("compiled")
"""

# The fused LM head in every dtype, with its launch settings (run under gpu_preflight.sh,
# also on the GPU machines' triton 3.6): triton 3.6 refused every fp64 kernel while the row
# mask was bool, and fp64 bwd_weight asked for 336 KiB of shared memory (a GPU review).
# An H100 / H200 block may use at most 227 KiB.
LINEAR_KERNELS = """
import torch
from vapo_kernels.triton import linear_logprobs as LL

SHARED_LIMIT = 232448
for dtype, elt, acc in ((torch.bfloat16, "*bf16", tl.float32), (torch.float32, "*fp32", tl.float32),
                        (torch.float64, "*fp64", tl.float64)):
    for name, kernel in (("fwd", LL._fwd_kernel), ("bwd_hidden", LL._bwd_hidden_kernel),
                         ("bwd_weight", LL._bwd_weight_kernel)):
        meta = LL._meta(dtype, None, None, None, name)
        num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
        meta.update(HAS_BIAS=True, HAS_GENT=True)
        pointers = {"h_ptr": elt, "w_ptr": elt, "b_ptr": elt, "valid_ptr": "*i32"}
        out = compile_for_sm90(kernel, meta, acc, num_warps, pointers, num_stages)
        assert out.metadata.shared <= SHARED_LIMIT, (name, dtype, out.metadata.shared)
print("compiled")
"""

# GAE (each launch plan) and the log-prob rows, fp32 and fp64.
SCAN_AND_ROW_KERNELS = """
from vapo_kernels.triton import gae as G, logprobs as LP

for acc, elt in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):
    flags = dict(HAS_MASK=True, SKIP=True, BLOCK=G.GPU_BLOCK, ACC=acc)
    compile_for_sm90(G._gae_seq_kernel, flags, acc, G.GPU_NUM_WARPS)
    compile_for_sm90(G._gae_summary_kernel, dict(flags, NSEG=G.MAX_SEGMENTS), acc, G.GPU_NUM_WARPS)
    compile_for_sm90(G._gae_segment_kernel, dict(flags, NSEG=G.MAX_SEGMENTS), acc, G.GPU_NUM_WARPS)
    block, warps = LP._launch_params(152064, None)
    rows = {"z_ptr": elt, "out_ptr": elt}
    compile_for_sm90(LP._token_logprobs_fwd_kernel, dict(HAS_VALID=True, BLOCK_V=block, ACC=acc),
                     acc, warps, rows)
    compile_for_sm90(LP._token_logprobs_bwd_kernel,
                     dict(HAS_VALID=True, HAS_GH=True, BLOCK_V=block, ACC=acc), acc, warps, rows)
print("compiled")
"""

needs_cuda_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton has no CUDA backend",
)


def _compile(tmp_path, body: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cache hit
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences its warning
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


@needs_cuda_backend
def test_loss_kernels_compile_for_sm90(tmp_path):
    _compile(tmp_path, LOSS_KERNELS)


@needs_cuda_backend
def test_rollout_variants_compile_for_sm90(tmp_path):
    _compile(tmp_path, ROLLOUT_VARIANTS)


@needs_cuda_backend
def test_fused_lm_head_kernels_compile_for_sm90_within_its_shared_memory(tmp_path):
    _compile(tmp_path, LINEAR_KERNELS)


@needs_cuda_backend
def test_gae_and_logprob_kernels_compile_for_sm90(tmp_path):
    _compile(tmp_path, SCAN_AND_ROW_KERNELS)
