"""The fixed-length sampling loop (ORIGINAL §5): one full pass over the context, then one KV-cached step per token.

Exactly `length` tokens are drawn; there is no stop at EOS. Logits are scaled by 1/max(temperature, 1e-10) before
drawing and before the recorded log-probability, top-k/top-p never touch the first token (as in the original), and
the pad id can never be drawn because logits only cover the vocabulary.
"""
import torch

from lm_human_preferences.language.model import GPT2, KVCache
from lm_human_preferences.utils.core import take_top_k_logits, take_top_p_logits


BLOCK = 1024  # vocabulary block of the two-level inverse-CDF draw


def draw_uniforms(generators, rows: int, length: int, device) -> torch.Tensor:
    """The random numbers of `length` draws for `rows` rows, (rows, length) float64 in [0, 1): from one
    torch.Generator, or from a sequence of them, one per equal block of rows (the virtual ranks a process hosts,
    each drawing its own rows from its own stream). Drawing them before sampling makes the tokens independent of
    how the rows are split into micro-batches or processes."""
    if isinstance(generators, torch.Generator) or generators is None:
        generators = [generators]
    block = rows // len(generators)
    if block * len(generators) != rows:
        raise ValueError(f"{rows} rows do not split into {len(generators)} equal blocks, one per generator")
    return torch.cat([torch.rand(block, length, generator=g, device=device, dtype=torch.float64)
                      for g in generators])


def sample_from_logits(logits, uniform=None, greedy=False, probs=None):
    """Draws one token per row of float32 logits (B, V) from softmax(logits), with the row's number `uniform` (B,)
    float64 in [0, 1); greedy takes the argmax (used to replay the reference). `probs`, softmax(logits), is computed
    when not given.

    Two-level inverse-CDF sampling: the uniform number of a row picks a block of BLOCK tokens from the float64
    running sum of the blocks' probability masses (each summed in float32), then a token from the float64 running
    sum inside that block. It reads the probabilities once and sums in float64 only BLOCK of them per row, where a
    whole-row float64 cumsum makes a float64 copy of the probabilities and writes another, and torch.multinomial
    draws V exponential numbers per row (about 30x slower). Tokens of probability 0 (masked by top-k/top-p) are
    never drawn.
    """
    if greedy:
        return logits.argmax(dim=-1)
    if uniform is None:
        raise ValueError("sampling needs one uniform number per row (draw_uniforms), or greedy=True")
    B, V = logits.shape
    if probs is None:
        probs = torch.softmax(logits, dim=-1)  # (B, V) float32
    full = V // BLOCK * BLOCK
    masses = probs[:, :full].view(B, -1, BLOCK).sum(dim=-1)  # (B, nb)
    if full < V:
        masses = torch.cat([masses, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = masses.double().cumsum_(dim=-1)  # (B, nb)
    total = block_cdf[:, -1:].contiguous()
    u = uniform.to(torch.float64).reshape(B, 1) * total
    # the first block whose running mass exceeds u (a block of mass > 0); guards u == total after rounding
    block = torch.minimum(torch.searchsorted(block_cdf, u, right=True), torch.searchsorted(block_cdf, total))
    below = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # mass before the block
    index = block * BLOCK + torch.arange(min(BLOCK, V), device=logits.device)  # (B, BLOCK) token ids
    inside = torch.where(index < V, probs.gather(1, index.clamp(max=V - 1)), 0.0).double().cumsum_(dim=-1)
    # the first token whose running mass exceeds u - below, or the block's last token of mass > 0 after rounding
    offset = torch.minimum(torch.searchsorted(inside, u - below, right=True),
                           torch.searchsorted(inside, inside[:, -1:].contiguous()))
    return (block * BLOCK + offset).squeeze(1)


@torch.no_grad()
def sample_sequence(model: GPT2, context, length: int, *, padding_token, temperature=1.0, top_k=0, top_p=1.0,
                    value_head="value", uniforms=None, greedy=False):
    """Samples `length` tokens after `context` (B, ctx_len), which may hold pads (right-padded queries), drawing
    token t of row b with the number uniforms[b, t] (`draw_uniforms`); greedy takes the argmax instead.

    Returns tokens (B, length), logprobs (B, length) of the temperature-scaled distribution, and values (B, length)
    where values[:, t] is the value head's output on context + tokens[:, :t] (None without a value head).
    """
    B, ctx_len = context.shape
    if not greedy and (uniforms is None or tuple(uniforms.shape) != (B, length)):
        raise ValueError(f"sampling {B} rows x {length} tokens needs uniforms of that shape (draw_uniforms), got "
                         f"{None if uniforms is None else tuple(uniforms.shape)}")
    beta = 1.0 / max(temperature, 1e-10)
    cache = KVCache(model.config, B, ctx_len + length, context.device)
    tokens = torch.empty(B, length, dtype=torch.long, device=context.device)
    logprobs = torch.empty(B, length, dtype=torch.float32, device=context.device)
    has_value = value_head is not None and value_head in model.heads
    values = torch.empty(B, length, dtype=torch.float32, device=context.device) if has_value else None

    # the last context position (a pad for right-padded queries) carries the last real token's output
    out = model(context, padding_token=padding_token, cache=cache, lm_positions=slice(-1, None))
    for t in range(length):
        logits = out["lm_logits"][:, -1].mul_(beta)  # (B, V) float32, a fresh tensor scaled in place
        if t > 0:
            if top_k:
                logits = take_top_k_logits(logits, top_k)
            if top_p < 1.0:
                logits = take_top_p_logits(logits, top_p)
        probs = torch.softmax(logits, dim=-1)  # one fused pass; a drawn token has probability > 0
        token = sample_from_logits(logits, None if greedy else uniforms[:, t], greedy, probs=probs)
        tokens[:, t] = token
        logprobs[:, t] = torch.log(probs.gather(1, token[:, None])).squeeze(1)
        if has_value:
            values[:, t] = out[value_head][:, -1]
        if t + 1 < length:
            out = model(token[:, None], padding_token=padding_token, cache=cache, lm_positions=slice(-1, None),
                        check_tokens=False)
    return {"tokens": tokens, "logprobs": logprobs, "values": values}
