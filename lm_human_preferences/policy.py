"""The policy: GPT-2 with a zero-initialised value head on the same trunk, and the task temperature (ORIGINAL §10).

The temperature divides the logits everywhere: sampling, the stored rollout logprobs, the reference policy's
logprobs, and the PPO logprobs and entropy. `forward` is the teacher-forced pass (so DDP can wrap a Policy), one
model pass for logprobs, entropies and values; `respond` samples with the KV cache. The logprobs and entropies come
from one fused float32 pass over the logits (language/fused.py), under autocast and in float32 runs alike.
"""
import torch
import torch.nn as nn

from lm_human_preferences.language import fused
from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.sample import draw_uniforms, sample_sequence
from lm_human_preferences.lm_tasks import format_queries


class Policy(nn.Module):
    def __init__(self, model: GPT2, *, temperature: float, padding_token: int, prefix_tokens=(), suffix_tokens=()):
        super().__init__()
        if "value" not in model.heads:
            raise ValueError("a Policy needs a GPT2 built with scalar_heads=['value']")
        self.model = model
        self.temperature = temperature
        self.padding_token = padding_token
        self.register_buffer("prefix_tokens", torch.tensor(list(prefix_tokens), dtype=torch.long), persistent=False)
        self.register_buffer("suffix_tokens", torch.tensor(list(suffix_tokens), dtype=torch.long), persistent=False)

    def context(self, queries):
        """prefix + right-padded query + suffix, (B, ctx_len)."""
        return format_queries(queries, self.prefix_tokens, self.suffix_tokens)

    @torch.no_grad()
    def respond(self, queries, length: int, *, generator=None, uniforms=None, greedy=False, top_k=0, top_p=1.0):
        """Samples `length` tokens per query: responses, logprobs (temperature-scaled) and values, each (B, length).
        Token t of row b is drawn with the number uniforms[b, t] (language/sample.py draw_uniforms), or, without
        `uniforms`, with numbers drawn from `generator` now."""
        if uniforms is None and not greedy:
            uniforms = draw_uniforms(generator, len(queries), length, queries.device)
        out = sample_sequence(self.model, self.context(queries), length, padding_token=self.padding_token,
                              temperature=self.temperature, top_k=top_k, top_p=top_p, uniforms=uniforms,
                              greedy=greedy)
        return {"responses": out["tokens"], "logprobs": out["logprobs"], "values": out["values"]}

    def forward(self, queries, responses, *, with_entropy=True):
        """Teacher-forced pass (`analyze_responses`): logprobs, entropies and values of `responses`, each (B, T)."""
        context = self.context(queries)
        ctx_len, T = context.shape[1], responses.shape[1]
        tokens = torch.cat([context, responses], dim=1)
        # position ctx_len-1+t predicts response token t
        out = self.model(tokens, padding_token=self.padding_token, lm_positions=slice(ctx_len - 1, ctx_len - 1 + T))
        result = {"values": out["value"][:, ctx_len - 1:ctx_len - 1 + T]}
        # log softmax(logits / t) at the responses and the entropy of softmax(logits / t), float32
        logprobs, entropies = fused.logprobs_entropy(out["lm_logits"], responses, max(self.temperature, 1e-10))
        result["logprobs"] = logprobs
        if with_entropy:
            result["entropies"] = entropies
        return result

    analyze_responses = forward
