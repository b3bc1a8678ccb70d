"""The reward model: a fresh GPT-2 with a reward head, then a trainable scalar gain and bias (ORIGINAL §4.6, §9).

reward(q, r) = gain * head(h[concat(q, r)])[:, -1] + bias, read at the last position, which by the pad rule of
§4.3 is the last real token. The reward model sees the raw query: no task prefix or suffix.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn

from lm_human_preferences.language.model import GPT2
from lm_human_preferences.language.trained_models import check_state_dict, load_model, read_model_config
from lm_human_preferences.utils.ckpt import CheckpointError, load_tensors


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


def load_reward_model(path: str, *, n_vocab: int, padding_token: int, device="cpu") -> RewardModel:
    """A frozen reward model from a reward run's `reward_model/` directory ('test': a random test model)."""
    if path is None:
        raise ValueError("no reward model: set rewards.trained_model to a reward run's reward_model/ directory or "
                         "turn on rewards.train_new_model")
    if path == "test":
        rm = RewardModel(load_model("test", ["reward"], n_vocab=n_vocab), padding_token=padding_token)
    else:
        d = Path(path)
        missing = [f for f in ("model.safetensors", "hparams.json") if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"reward model directory {d} lacks {', '.join(missing)}; point "
                                    f"rewards.trained_model at the reward_model/ directory a train_reward run wrote")
        config = read_model_config(d)
        if config.n_vocab != n_vocab:
            raise CheckpointError(f"reward model {d} has n_vocab={config.n_vocab} but the task's encoding has {n_vocab}")
        sd = load_tensors(d / "model.safetensors")
        for key in ("reward_norm.gain", "reward_norm.bias"):
            if key not in sd:
                raise CheckpointError(f"{d / 'model.safetensors'} has no {key!r}; it was not written by train_reward")
        rm = RewardModel(GPT2(config, ["reward"]), padding_token=padding_token)
        gain, bias = sd.pop("reward_norm.gain"), sd.pop("reward_norm.bias")
        check_state_dict(rm.model, sd, allow_missing_heads=False)
        rm.model.load_state_dict(sd)
        with torch.no_grad():
            rm.gain.copy_(gain)
            rm.bias.copy_(bias)
    rm.requires_grad_(False)
    return rm.eval().to(device)
