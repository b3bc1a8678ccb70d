"""Float32 matrix products on the fastest kernel the CPU build offers: the LM head, and the large Linear layers
when no gradient is needed (sampling, scoring).

The LM head multiplies a few hundred hidden states by the (50,257 x n_embd) embedding matrix: a product with a long
output dimension and a short reduction one (n_embd). PyTorch's float32 `mm` sends it to MKL's sgemm, which handles
that shape poorly on some processors; oneDNN's inner-product kernel (the one `torch.ops.mkldnn._linear_pointwise`
runs, what Inductor uses for float32 linears on CPU) handles it well everywhere. Measured on a 2-core AMD EPYC
(Zen 3, AVX2, torch 2.13), h (N, 64) @ W^T for W (50257, 64): N=256 37 -> 88 GFLOP/s, N=1024 17 -> 58 GFLOP/s;
at 124M's width (N=704, K=768) 65 -> 106 GFLOP/s. For a reduction of n_embd <= 64 the two give the same bits
(measured); for wider models they differ in the last bits of float32 (summation order), like any two BLAS libraries.

The same holds for the blocks' Linear layers in the few-row products of sampling: at GPT-2 124M's shapes with 8 rows
(one decode step of 8 sequences), oneDNN runs c_attn 1.8x, c_fc 3.8x and mlp.c_proj 4.5x faster than MKL (the
decode step is bound by reading the weights, and MKL reads them at 2-3 GB/s where oneDNN reaches 7-12). For small
weights (the demo's 64-wide model) oneDNN's call overhead makes it slower, so `linear` uses it only for weights of
at least ONEDNN_MIN_WEIGHT elements, and only without autograd (training passes keep nn.Linear).

Only forward products go to oneDNN: for the backward's products (long reductions) MKL is as fast or faster.
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


ONEDNN_MIN_WEIGHT = 2 ** 18  # elements (1 MB of float32): smaller Linear weights stay on MKL (measured faster there)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """layer(x) for x (..., in); on oneDNN when no gradient is needed, the weight is large and everything is float32
    on the CPU outside autocast (see the module docstring), else through the layer itself."""
    op = onednn_linear()
    w = layer.weight
    if (op is None or x.device.type != "cpu" or w.numel() < ONEDNN_MIN_WEIGHT or x.dtype != torch.float32
            or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return layer(x)
    out = op(x.reshape(-1, x.shape[-1]).contiguous(), w, layer.bias, "none", [], "")
    return out.view(*x.shape[:-1], w.shape[0])
