"""The fixed-length sampling loop (ORIGINAL §5): one full pass over the context, then one KV-cached step per token.

Exactly `length` tokens are drawn; there is no stop at EOS. Logits are scaled by 1/max(temperature, 1e-10) before
drawing and before the recorded log-probability, top-k/top-p never touch the first token (as in the original), and
the pad id can never be drawn because logits only cover the vocabulary.
"""
import torch

from lm_human_preferences.language.model import GPT2, KVCache
from lm_human_preferences.utils.core import logprobs_from_logits, take_top_k_logits, take_top_p_logits


def sample_from_logits(logits, generator=None, greedy=False):
    """Draws one token per row of float32 logits (B, V) from softmax(logits); greedy takes the argmax (used to
    replay the reference).

    Inverse-CDF sampling: one uniform number per row against the float64 running sum of the probabilities, where
    torch.multinomial draws V exponential numbers per row (about 30x slower for GPT-2's 50,257 tokens on a CPU,
    a tenth of a sampling step). Tokens of probability 0 (masked by top-k/top-p) are never drawn.
    """
    if greedy:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(logits, dim=-1).double().cumsum_(dim=-1)  # (B, V)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=torch.float64) * total
    token = torch.searchsorted(cdf, u, right=True)  # the first index whose cdf exceeds u: a token of mass > 0
    last_positive = torch.searchsorted(cdf, total)  # guards u == total after rounding
    return torch.minimum(token, last_positive).squeeze(1)


@torch.no_grad()
def sample_sequence(model: GPT2, context, length: int, *, padding_token, temperature=1.0, top_k=0, top_p=1.0,
                    value_head="value", generator=None, greedy=False):
    """Samples `length` tokens after `context` (B, ctx_len), which may hold pads (right-padded queries).

    Returns tokens (B, length), logprobs (B, length) of the temperature-scaled distribution, and values (B, length)
    where values[:, t] is the value head's output on context + tokens[:, :t] (None without a value head).
    """
    B, ctx_len = context.shape
    beta = 1.0 / max(temperature, 1e-10)
    cache = KVCache(model.config, B, ctx_len + length, context.device)
    tokens = torch.empty(B, length, dtype=torch.long, device=context.device)
    logprobs = torch.empty(B, length, dtype=torch.float32, device=context.device)
    has_value = value_head is not None and value_head in model.heads
    values = torch.empty(B, length, dtype=torch.float32, device=context.device) if has_value else None

    # the last context position (a pad for right-padded queries) carries the last real token's output
    out = model(context, padding_token=padding_token, cache=cache, lm_positions=slice(-1, None))
    for t in range(length):
        logits = out["lm_logits"][:, -1] * beta  # (B, V) float32
        if t > 0:
            if top_k:
                logits = take_top_k_logits(logits, top_k)
            if top_p < 1.0:
                logits = take_top_p_logits(logits, top_p)
        token = sample_from_logits(logits, generator, greedy)
        tokens[:, t] = token
        logprobs[:, t] = logprobs_from_logits(logits, token)
        if has_value:
            values[:, t] = out[value_head][:, -1]
        if t + 1 < length:
            out = model(token[:, None], padding_token=padding_token, cache=cache, lm_positions=slice(-1, None),
                        check_tokens=False)
    return {"tokens": tokens, "logprobs": logprobs, "values": values}
