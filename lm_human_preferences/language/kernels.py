"""The float32 matrix product of the LM head, on the fastest kernel the CPU build offers.

The LM head multiplies a few hundred hidden states by the (50,257 x n_embd) embedding matrix: a product with a long
output dimension and a short reduction one (n_embd). PyTorch's float32 `mm` sends it to MKL's sgemm, which handles
that shape poorly on some processors; oneDNN's inner-product kernel (the one `torch.ops.mkldnn._linear_pointwise`
runs, what Inductor uses for float32 linears on CPU) handles it well everywhere. Measured on a 2-core AMD EPYC
(Zen 3, AVX2, torch 2.13), h (N, 64) @ W^T for W (50257, 64): N=256 37 -> 88 GFLOP/s, N=1024 17 -> 58 GFLOP/s;
at 124M's width (N=704, K=768) 65 -> 106 GFLOP/s. For a reduction of n_embd <= 64 the two give the same bits
(measured); for wider models they differ in the last bits of float32 (summation order), like any two BLAS libraries.

Only the forward product goes to oneDNN: for the backward's products (long reductions) MKL is as fast or faster.
The choice is fixed per build (oneDNN present and the op registered), not timed, so every process of a run, and a
resumed run, computes the same bits. LMHP_HEAD_GEMM=aten turns it off.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def onednn_linear():
    """torch.ops.mkldnn._linear_pointwise where this build has it (CPU builds with oneDNN), else None."""
    if os.environ.get("LMHP_HEAD_GEMM", "").lower() == "aten":
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if not torch.equal(op(x, w, None, "none", [], ""), x @ w.t()):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def linear_nt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a 2-D float32 x (N, C) and weight (V, C): (N, V), contiguous. Not differentiable through
    oneDNN: callers that need gradients (TiedLMHead) write their own backward."""
    op = onednn_linear()
    if (op is not None and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return op(x.contiguous(), weight.contiguous(), None, "none", [], "")
    return torch.mm(weight, x.t()).t().contiguous()  # (W x^T)^T: on CPU faster than x W^T through MKL
