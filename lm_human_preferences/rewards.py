"""The reward model: a fresh GPT-2 with a reward head, then a trainable scalar gain and bias (ORIGINAL §4.6, §9).

reward(q, r) = gain * head(h[concat(q, r)])[:, -1] + bias, read at the last position, which by the pad rule of
§4.3 is the last real token. The reward model sees the raw query: no task prefix or suffix.
"""
import math

import torch
import torch.nn as nn

from lm_human_preferences.language.model import GPT2


class RewardModel(nn.Module):
    def __init__(self, model: GPT2, *, padding_token: int):
        super().__init__()
        if "reward" not in model.heads:
            raise ValueError("a RewardModel needs a GPT2 built with scalar_heads=['reward']")
        self.model = model
        self.padding_token = padding_token
        # named like the original's reward_norm/gain and reward_norm/bias; trained with the rest of the model
        self.gain = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, queries, responses):
        """Rewards (B,) float32 for raw queries (B, q) and responses (B, T)."""
        tokens = torch.cat([queries, responses], dim=1)
        out = self.model(tokens, padding_token=self.padding_token)
        return self.gain * out["reward"][:, -1] + self.bias

    @torch.no_grad()
    def reset_reward_scale(self):
        self.gain.fill_(1.0)
        self.bias.fill_(0.0)

    @torch.no_grad()
    def set_reward_norm(self, *, old_mean, old_std, new_mean, new_std):
        """Composes an affine map sending rewards with (old_mean, old_std) to (new_mean, new_std) onto gain/bias."""
        values = dict(old_mean=old_mean, old_std=old_std, new_mean=new_mean, new_std=new_std)
        if not all(math.isfinite(float(v)) for v in values.values()) or float(old_std) == 0:
            raise FloatingPointError(f"cannot normalize rewards with statistics {values}: the reward model's outputs "
                                     f"are not finite or have zero spread")
        gain = new_std / old_std
        bias = new_mean - gain * old_mean
        self.bias.copy_(gain * self.bias + bias)
        self.gain.copy_(gain * self.gain)
