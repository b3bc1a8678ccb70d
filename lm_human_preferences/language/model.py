"""GPT-2, written to match OpenAI's original TF model (ORIGINAL §4) number for number.

What differs from a textbook GPT-2 is the padding semantics of §4.3, which the whole RLHF pipeline relies on:
pad tokens are embedded as token 0, never attended to (past keys included), skipped by the position ids
(positions are the exclusive cumulative sum of the non-pad mask), and every output at a pad position is a copy
of the output at the last real position before it. Scalar heads (value, reward) sit on the final hidden state.

The KV cache is preallocated once per sampling run (static shapes, no re-copy per decode step) and carries the
non-pad mask and the real-token count of what it holds, so masks and positions stay right during decoding.

What is there only to be fast (oneDNN products, CPU bfloat16 attention, the tied embedding's in-place gradient)
lives in fused.py; each `fused.` call below computes the plain op its name says.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from lm_human_preferences.language import fused
from lm_human_preferences.utils.core import gelu

MASK_VALUE = -1e10  # the original's additive mask: w*b - 1e10*(1-b)


@dataclass
class GPT2Config:
    n_vocab: int = 50257  # vocabulary size; the pad id lies outside it
    n_ctx: int = 1024  # maximum sequence length (positions)
    n_embd: int = 768  # width of the residual stream
    n_head: int = 12  # attention heads
    n_layer: int = 12  # transformer blocks

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Builds a config from a hparams.json dict (extra keys such as the original's dropout rates are ignored)."""
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in d]
        if missing:
            raise ValueError(f"model hparams are missing {missing}; expected n_vocab, n_ctx, n_embd, n_head, n_layer")
        return cls(**{k: int(d[k]) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


def test_config():
    """The original's `test` model hparams (ORIGINAL §4.9)."""
    return GPT2Config(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)


class KVCache:
    """Preallocated keys/values for every layer, plus the non-pad mask and real-token count of the cached tokens."""

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int, device):
        if max_len > config.n_ctx:
            raise ValueError(f"a sequence of {max_len} tokens does not fit in the model's n_ctx={config.n_ctx}")
        self.config = config
        self.max_len = max_len
        self.length = 0  # tokens cached so far
        self.kv = None  # [n_layer, 2, B, n_head, max_len, head_dim], allocated at the first write (dtype of k)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # non-pad mask of cached tokens
        self.n_real = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # real tokens cached, per row

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores this step's k, v (B, nh, s, hs) for `layer`; returns all keys/values cached so far incl. these."""
        s = k.shape[2]
        if self.kv is None:
            B, nh, _, hs = k.shape
            self.kv = torch.empty(self.config.n_layer, 2, B, nh, self.max_len, hs, dtype=k.dtype, device=k.device)
        end = self.length + s
        self.kv[layer, 0, :, :, self.length:end] = k
        self.kv[layer, 1, :, :, self.length:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def advance(self, mask: torch.Tensor):
        """Commits a forward step whose tokens had non-pad `mask` (B, s)."""
        s = mask.shape[1]
        self.mask[:, self.length:self.length + s] = mask
        self.n_real += mask.sum(dim=1, keepdim=True)
        self.length += s

    def present(self, start=0, end=None):
        """The cache in the original's layout: [B, n_layer, 2, n_head, seq, head_dim]."""
        end = self.length if end is None else end
        return self.kv[:, :, :, :, start:end].permute(2, 0, 1, 3, 4, 5)

    @classmethod
    def from_present(cls, config, present: torch.Tensor, past_mask: torch.Tensor, max_len: int):
        """Builds a cache from an original-layout `present` [B, n_layer, 2, nh, seq, hs] and its non-pad mask [B, seq]."""
        B, _, _, _, seq, _ = present.shape
        cache = cls(config, B, max_len, present.device)
        cache.kv = torch.zeros(config.n_layer, 2, B, config.n_head, max_len, config.head_dim,
                               dtype=present.dtype, device=present.device)
        cache.kv[:, :, :, :, :seq] = present.permute(1, 2, 0, 3, 4, 5)
        cache.advance(past_mask.bool())
        return cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v (in that order)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, attn_bias, cache: KVCache | None, layer: int):
        B, s, C = x.shape
        q, k, v = fused.linear(x, self.c_attn).split(C, dim=2)
        q = q.view(B, s, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, s, hs)
        k = k.view(B, s, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, s, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, S, hs), S = cached + s
        y = fused.attention(q, k, v, attn_bias)  # softmax(q k^T / sqrt(hs) + attn_bias) v, (B, nh, s, hs)
        return fused.linear(y.transpose(1, 2).reshape(B, s, C), self.c_proj)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return fused.linear(gelu(fused.linear(x, self.c_fc)), self.c_proj)


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, attn_bias, cache, layer):
        x = x + self.attn(self.ln_1(x), attn_bias, cache, layer)
        return x + self.mlp(self.ln_2(x))


class ScalarHead(nn.Module):
    """The original's `fc_layer` head: w of shape [n_embd] and a scalar b; output h.w + b per position."""

    def __init__(self, n_embd: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.w = nn.Parameter(torch.empty(n_embd))
        self.b = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.w.normal_(0.0, self.init_std) if self.init_std > 0 else self.w.zero_()
            self.b.zero_()

    def forward(self, h):  # (B, s, C) -> (B, s), float32
        with torch.autocast(device_type=h.device.type, enabled=False):
            return h.float() @ self.w.float() + self.b.float()


def head_init_std(name: str, n_embd: int) -> float:
    """Value heads start at exactly zero; every other head at N(0, 1/sqrt(n_embd+1)) (ORIGINAL §4.6)."""
    return 0.0 if name == "value" else 1.0 / math.sqrt(n_embd + 1)


def attention_bias(mask, cache: KVCache | None):
    """0 where current query i may attend key j, MASK_VALUE elsewhere: (B, 1, s, S) float32 for the non-pad mask
    (B, s) of the current tokens, S = cached + s. Causal counted from the bottom right; pad keys (cached ones
    included) are never attended."""
    s = mask.shape[1]
    past = 0 if cache is None else cache.length
    key_mask = mask if cache is None else torch.cat([cache.mask[:, :past], mask], dim=1)  # (B, S)
    causal = torch.ones(s, past + s, dtype=torch.bool, device=mask.device).tril(diagonal=past)
    allowed = causal[None] & key_mask[:, None, :]  # (B, s, S)
    attn_bias = torch.zeros(allowed.shape, dtype=torch.float32, device=mask.device)
    return attn_bias.masked_fill(~allowed, MASK_VALUE)[:, None]  # (B, 1, s, S)


def copy_last_real(h, mask):
    """h (B, s, C) with each pad position's output replaced by that of the nearest earlier real position."""
    B, s = mask.shape
    idx = torch.arange(s, device=mask.device).expand(B, s)
    last_real = torch.cummax(torch.where(mask, idx, 0), dim=1).values  # (B, s), cumulative max of real indices
    return torch.gather(h, 1, last_real[:, :, None].expand(-1, -1, h.shape[-1]))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config, scalar_heads=()):
        super().__init__()
        fused.cuda_tf32_from_env()  # LMHP_TF32=1: TF32 for CUDA's float32 matmuls (ValueError for a bad value)
        self.config = config
        self.wte = nn.Embedding(config.n_vocab, config.n_embd)
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.heads = nn.ModuleDict({name: ScalarHead(config.n_embd, head_init_std(name, config.n_embd))
                                    for name in scalar_heads})
        self.init_weights()

    def init_weights(self):
        """The original's initialisers (ORIGINAL §4.7); only random `test` models keep them."""
        c = self.config
        with torch.no_grad():
            self.wpe.weight.normal_(0.0, 0.01)
            self.wte.weight.normal_(0.0, 0.02)
            for block in self.h:
                block.attn.c_attn.weight.normal_(0.0, 1 / math.sqrt(c.n_embd))
                block.attn.c_proj.weight.normal_(0.0, 1 / math.sqrt(c.n_embd * c.n_layer))
                block.mlp.c_fc.weight.normal_(0.0, 1 / math.sqrt(c.n_embd))
                block.mlp.c_proj.weight.normal_(0.0, 1 / math.sqrt(4 * c.n_embd * c.n_layer))
                for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                    lin.bias.zero_()
            for head in self.heads.values():
                head.reset_parameters()

    def check_tokens(self, tokens, padding_token):
        """Raises if a token id is outside the vocabulary and is not the pad id.

        On an accelerator this is an asynchronous device-side assert (reading the ids on the host would stall every
        forward): a bad id stops the run at the next synchronisation, with CUDA's message instead of this one; the
        readable checks there are those where tokens enter (query datasets, label files, task settings)."""
        ok = (tokens >= 0) & (tokens < self.config.n_vocab)
        if padding_token is not None:
            ok |= tokens == padding_token
        if not fused.host_reads_are_free(tokens.device):
            torch._assert_async(ok.all(), f"a token id is outside the vocabulary [0, {self.config.n_vocab}) and is "
                                          f"not the padding token {padding_token}")
        elif not ok.all():
            bad = tokens[~ok][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.n_vocab}) and is not the "
                             f"padding token {padding_token}; check the encoding the data was tokenized with")

    def forward(self, tokens, *, padding_token=None, cache: KVCache | None = None, lm_positions=None,
                check_tokens=True):
        """Runs the model on tokens (B, s), after what `cache` holds if given.

        lm_positions: None computes no LM logits (value/reward passes), 'all' computes them everywhere, and a slice
        computes them only for those current positions. Returns a dict with 'h' (B, s, C), 'lm_logits'
        (float32) when asked, one (B, s) float32 entry per scalar head, and 'present' (the cache) when one is given.
        """
        s = tokens.shape[1]  # tokens (B, s)
        past = 0 if cache is None else cache.length
        if past + s > self.config.n_ctx:
            raise ValueError(f"a sequence of {past + s} tokens is longer than the model's n_ctx={self.config.n_ctx}; "
                             f"shorten query_length/response_length or use a model with a larger context")
        if check_tokens and past == 0:
            self.check_tokens(tokens, padding_token)
        if padding_token is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            mask = tokens != padding_token
            tokens = torch.where(mask, tokens, 0)  # a pad is embedded as token 0

        # positions: exclusive cumsum of the non-pad mask, counting the real tokens already cached
        positions = torch.cumsum(mask, dim=1) - mask.long()
        if cache is not None:
            positions = positions + cache.n_real
        tied = fused.tied_grad(self.wte.weight, with_lm_head=lm_positions is not None)  # None unless training
        x = fused.embedding(tokens, self.wte.weight, tied) + self.wpe(positions)  # (B, s, C)
        attn_bias = attention_bias(mask, cache)  # (B, 1, s, S)
        for layer, block in enumerate(self.h):
            x = block(x, attn_bias, cache, layer)
        h = self.ln_f(x)
        if cache is not None:
            cache.advance(mask)
        if padding_token is not None:
            h = copy_last_real(h, mask)

        out = {"h": h, **{name: head(h) for name, head in self.heads.items()}}
        if lm_positions is not None:
            # tied embeddings, no output bias, always float32 (logprob differences are PPO's signal)
            out["lm_logits"] = fused.lm_head(h if lm_positions == "all" else h[:, lm_positions], self.wte.weight, tied)
        if cache is not None:
            out["present"] = cache
        return out

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, with_lm_head: bool = True) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add), used for MFU."""
        c = self.config
        per_layer = 2 * (c.n_embd * 3 * c.n_embd + c.n_embd * c.n_embd + 2 * c.n_embd * 4 * c.n_embd)
        attn = 2 * 2 * c.n_embd * seq_len  # q.k and a.v against seq_len keys
        head = 2 * c.n_embd * c.n_vocab if with_lm_head else 0
        return c.n_layer * (per_layer + attn) + head
