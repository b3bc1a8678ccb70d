"""Speed code for model.py and policy.py: each piece computes what its docstring names (the same bits, or where
said, the same numbers within float32 rounding), only faster or in less memory.

- `linear`, `linear_nt`: float32 products on oneDNN's CPU kernel (the blocks' Linear layers without autograd, the
  LM head).
- `attention`: on CPU under bfloat16 autocast, attention computed in float32 by hand.
- `tied_grad`, `embedding`, `lm_head`: the tied embedding matrix's two gradients summed in place.
- `logprobs_entropy`: logprobs and entropies in one chunked float32 pass with a hand-written backward.
- `store_linears_in`: a frozen model's Linear weights kept in bfloat16 for bfloat16 autocast.
- `host_reads_are_free`, `cuda_tf32_from_env`: what differs on an accelerator (below).

On an accelerator (CUDA), reading a tensor's values on the host (`.item()`, `bool()`, boolean indexing,
`torch.unique`, `.tolist()`) waits until every queued kernel has run, so the forward and backward never do it there:
the token check is an asynchronous device-side assert and the tied embedding's gradient is added row by row
(`index_add_`, no `torch.unique`). The LM head's product is cuBLAS's own `F.linear`, written straight into the
(N, V) logits (no transposed copy). Float32 products there stay full float32 unless LMHP_TF32=1, which allows
TF32 tensor cores for every float32 matmul on CUDA (the LM head under bf16, the whole model under fp32): about
10 bits of mantissa in the products' inputs, float32 accumulation. None of this changes a CPU run's numbers.

oneDNN. The LM head multiplies a few hundred hidden states by the (50,257 x n_embd) embedding matrix: a product with
a long output dimension and a short reduction one (n_embd). PyTorch's float32 `mm` sends it to MKL's sgemm, which
handles that shape poorly on some processors; oneDNN's inner-product kernel (the one
`torch.ops.mkldnn._linear_pointwise` runs, what Inductor uses for float32 linears on CPU) handles it well everywhere.
Measured on a 2-core AMD EPYC (Zen 3, AVX2, torch 2.13), h (N, 64) @ W^T for W (50257, 64): N=256 37 -> 88 GFLOP/s,
N=1024 17 -> 58 GFLOP/s; at 124M's width (N=704, K=768) 65 -> 106 GFLOP/s. For a reduction of n_embd <= 64 the two
give the same bits (measured); for wider models they differ in the last bits of float32 (summation order), like any
two BLAS libraries.

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
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN_MIN_WEIGHT = 2 ** 18  # elements (1 MB of float32): smaller Linear weights stay on MKL (measured faster there)
# rows of (rows, vocab) float32 logits LogprobsEntropy handles at once: cache-sized on CPU (about 6 MB at 50257),
# few kernel launches on accelerators
CPU_CHUNK_ROWS = 32
ACCELERATOR_CHUNK_ROWS = 1024


# ---- float32 products on oneDNN ----------------------------------------------------------------------------------

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
    if x.device.type != "cpu":
        return F.linear(x, weight)  # cuBLAS writes the (N, V) result directly
    return torch.mm(weight, x.t()).t().contiguous()  # (W x^T)^T: on CPU faster than x W^T through MKL


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
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


# ---- accelerators: no host reads, TF32 on request --------------------------------------------------------------

def host_reads_are_free(device: torch.device) -> bool:
    """True on the CPU, where reading a tensor's values on the host costs nothing; False on an accelerator (and the
    meta device), where it waits for every queued kernel, so callers take a formulation without host reads."""
    return device.type == "cpu"


def cuda_tf32_from_env() -> bool:
    """Allows TF32 for CUDA's float32 matmuls if the environment has LMHP_TF32=1 (returns whether it did); leaves
    the setting alone for 0 or unset. ValueError for any other value. Changes nothing on the CPU."""
    text = os.environ.get("LMHP_TF32", "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"environment variable LMHP_TF32={text!r} must be 1 (TF32 matmuls on CUDA) or 0; "
                         f"set it to 1 or 0, or unset it")
    if text == "1":
        torch.backends.cuda.matmul.allow_tf32 = True
    return text == "1"


# ---- attention ---------------------------------------------------------------------------------------------------

def attention(q, k, v, attn_bias):
    """softmax(q k^T / sqrt(hs) + attn_bias) v; q (B, nh, s, hs), k and v (B, nh, S, hs) -> (B, nh, s, hs).

    attn_bias (B, 1, s, S) is 0 where attending is allowed and -1e10 elsewhere, so a row with no allowed key becomes
    uniform (as in the original) instead of NaN. float32 inputs, and every input on an accelerator, go through
    scaled_dot_product_attention, whose kernels accumulate the softmax in float32. Lower-precision inputs on CPU
    (bfloat16 autocast) are upcast and the attention is computed in float32 by hand, as the original computes it:
    there the fused bfloat16 kernels are several times slower for these short masked sequences (backward most of
    all), and the attention's matmuls are a small part of the model's FLOPs.
    """
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, s, S)
        return torch.matmul(torch.softmax(w + attn_bias, dim=-1), v.float()).to(q.dtype)


# ---- the tied embedding matrix: embedding lookup and LM head -----------------------------------------------------

def lm_logits(h, weight):
    """h W^T in float32 for h (..., C) and the embedding matrix W (V, C): (..., V), contiguous (linear_nt)."""
    return linear_nt(h.reshape(-1, h.shape[-1]), weight).view(*h.shape[:-1], weight.shape[0])


class TiedGrad:
    """The LM head's gradient for the tied embedding matrix, on its way to the embedding's backward."""
    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class TiedLMHead(torch.autograd.Function):
    """logits = h W^T in float32, whose backward leaves W's gradient in `tied` instead of returning it.

    With the embedding lookup also taking W, autograd would add the two (V, C) gradients into a third; handing this
    one to TiedEmbedding lets the embedding's backward add its part in place: the same sum, one (V, C) buffer less
    at the end of the backward, when memory peaks. The LM head's backward always runs before the embedding's,
    which is upstream of everything.
    """

    @staticmethod
    def forward(ctx, h, weight, tied: TiedGrad):  # h (..., C), weight (V, C), both float32
        ctx.save_for_backward(h, weight)
        ctx.tied = tied
        return lm_logits(h, weight)  # autograd is off inside forward, so this takes linear_nt's fast path

    @staticmethod
    def backward(ctx, grad):  # grad (..., V)
        h, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_h = grad2d.mm(weight).view(h.shape) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            ctx.tied.grad = grad2d.t().mm(h.reshape(-1, h.shape[-1]))  # (V, C)
        return grad_h, None, None


class TiedEmbedding(torch.autograd.Function):
    """weight[tokens], whose backward adds its gradient to the LM head's one waiting in `tied` (if any).

    On the CPU the rows of each distinct token are summed in order of occurrence, as the dense embedding backward
    sums them, and then added to the LM head's gradient in place: the same bits as autograd's sum of the two dense
    gradients, without materialising either extra (V, C) matrix. On an accelerator `torch.unique` would wait for
    the queue, so each row is added to the LM head's gradient directly (the same sum within float32 rounding; in
    an order that may vary run to run, CUDA's atomics, unless torch.use_deterministic_algorithms(True)).
    """

    @staticmethod
    def forward(ctx, tokens, weight, tied: TiedGrad):
        ctx.save_for_backward(tokens)
        ctx.num_weights = weight.shape[0]
        ctx.tied = tied
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):  # grad (B, s, C)
        (tokens,) = ctx.saved_tensors
        grad_w, ctx.tied.grad = ctx.tied.grad, None
        if grad_w is None:
            return None, torch.ops.aten.embedding_dense_backward(grad, tokens, ctx.num_weights, -1, False), None
        if not host_reads_are_free(grad.device):  # every row straight into grad_w: no unique, no host sync
            rows = grad.reshape(-1, grad.shape[-1]).to(grad_w.dtype)
            return None, grad_w.index_add_(0, tokens.reshape(-1), rows), None
        unique, inverse = torch.unique(tokens.reshape(-1), return_inverse=True)
        sums = grad.new_zeros(len(unique), grad.shape[-1]).index_add_(0, inverse, grad.reshape(-1, grad.shape[-1]))
        return None, grad_w.index_add_(0, unique, sums.to(grad_w.dtype)), None


def tied_grad(weight, with_lm_head: bool) -> TiedGrad | None:
    """A TiedGrad for a float32 training pass that feeds the tied `weight` to both the embedding and the LM head
    (outside torch.compile), else None: then `embedding` and `lm_head` are the plain ops."""
    if (with_lm_head and torch.is_grad_enabled() and weight.requires_grad and weight.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        return TiedGrad()
    return None


def embedding(tokens, weight, tied: TiedGrad | None):
    """weight[tokens]: (B, s) -> (B, s, C)."""
    return TiedEmbedding.apply(tokens, weight, tied) if tied else F.embedding(tokens, weight)


def lm_head(h, weight, tied: TiedGrad | None):
    """h W^T for h (..., C) and the embedding matrix W (V, C): float32 logits (..., V), also under autocast."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        h = h.float()
        return TiedLMHead.apply(h, weight, tied) if tied else lm_logits(h, weight.float())


# ---- logprobs and entropies of the policy ------------------------------------------------------------------------

class LogprobsEntropy(torch.autograd.Function):
    """logprobs of `labels` and entropies under softmax(logits / temperature), in float32, row chunk by row chunk.

    The same quantities as logprobs_from_logits and entropy_from_logits on logits / temperature (equal within
    float32 rounding), with a hand-written backward, d logp / dl = onehot - p and d H / dl = -p (l - E_p[l]): it
    keeps only the logits for the backward, where autograd's chain keeps four (B, T, V) float32 tensors, and makes
    a few in-place passes over each cache-sized chunk instead of a dozen over the whole tensor (1.7x faster than a
    chunked out-of-place version, 4x than the plain ops, at 512 x 50,257 on a 2-core CPU).
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature: float):  # logits (N, V) float32, labels (N,)
        n = logits.shape[0]
        logprobs, entropies, lse = logits.new_empty(n), logits.new_empty(n), logits.new_empty(n)
        inv_t = 1.0 / temperature
        for r in _row_chunks(n, logits.device):
            z = logits[r] * inv_t  # l / t
            m = z.amax(dim=-1, keepdim=True)
            z.sub_(m)
            e = torch.exp(z)
            s = e.sum(dim=-1)
            log_s = torch.log(s)
            lse[r] = m.squeeze(-1) + log_s
            logprobs[r] = z.gather(-1, labels[r, None]).squeeze(-1) - log_s
            entropies[r] = log_s - torch.linalg.vecdot(e, z) / s  # log s - E_p[l/t - m]
        ctx.save_for_backward(logits, labels, lse, entropies)
        ctx.temperature = temperature
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropies):
        logits, labels, lse, entropies = ctx.saved_tensors
        inv_t = 1.0 / ctx.temperature
        grad = torch.empty_like(logits)
        for r in _row_chunks(logits.shape[0], logits.device):
            g = grad[r]
            torch.mul(logits[r], inv_t, out=g)
            g.sub_(lse[r, None])  # log p
            p = torch.exp(g)
            # (onehot gl - p (gl + ge (l/t - E_p[l/t]))) / t, where l/t - E_p[l/t] = log p + H
            g.add_(entropies[r, None]).mul_(grad_entropies[r, None]).add_(grad_logprobs[r, None]).mul_(p)
            g.mul_(-inv_t).scatter_add_(-1, labels[r, None], (grad_logprobs[r] * inv_t)[:, None])
        return grad, None, None


def _row_chunks(n: int, device: torch.device):
    """Slices covering range(n) in LogprobsEntropy's chunks for `device`."""
    size = CPU_CHUNK_ROWS if device.type == "cpu" else ACCELERATOR_CHUNK_ROWS
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def logprobs_entropy(logits, labels, temperature: float):
    """LogprobsEntropy on float32 logits (B, T, V) and labels (B, T): logprobs and entropies, each (B, T) float32,
    also under autocast."""
    B, T, V = logits.shape
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logprobs, entropies = LogprobsEntropy.apply(logits.reshape(B * T, V), labels.reshape(-1), temperature)
    return logprobs.view(B, T), entropies.view(B, T)


# ---- frozen models under bfloat16 autocast -----------------------------------------------------------------------

def store_linears_in(model, dtype: torch.dtype):
    """Keeps a GPT2's blocks' Linear weights and biases in `dtype`, for a frozen model that only runs under autocast.

    Autocast to `dtype` casts every Linear's operands to it anyway (rounding to nearest), so the outputs stay bit
    for bit the same, while a bf16 run's frozen reference policy and reward model take about half the memory
    and skip the weight casts of every forward. Embeddings (the float32 LM head), LayerNorms and scalar heads
    stay float32. The model must not require gradients; running it outside autocast to `dtype` raises.
    """
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("store_linears_in is for frozen models: call requires_grad_(False) first (a trained "
                         "model needs its float32 weights for the optimizer)")
    for block in model.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            lin.to(dtype)
    model.register_forward_pre_hook(functools.partial(_require_autocast, dtype=dtype), with_kwargs=True)
    return model


def _require_autocast(model, args, kwargs, *, dtype):
    """Raises unless the model's forward runs under autocast to `dtype` (store_linears_in's forward pre-hook)."""
    device = (args[0] if args else kwargs["tokens"]).device.type
    if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype):
        raise RuntimeError(f"this model keeps its Linear layers in {dtype} (store_linears_in); run it "
                           f"under torch.autocast({device!r}, dtype={dtype})")
