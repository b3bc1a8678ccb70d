"""Pure PPO math (ORIGINAL §10.2-10.5): KL-penalized rewards, whitening, GAE, the clipped loss and its 13
stats, the per-step objective stats and the KL controllers. Tensors in, tensors out; stats are detached
0-d float32 tensors so nothing here forces a device sync."""
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from lm_human_preferences.utils.core import exact_div, whiten

Stats = Dict[str, torch.Tensor]

# The names PPOTrainer.loss logs, in the original's order
PPO_STAT_KEYS = (
    "loss/policy", "loss/value", "loss/total",
    "policy/entropy", "policy/approxkl", "policy/clipfrac",
    "returns/mean", "returns/var",
    "val/vpred", "val/error", "val/clipfrac", "val/mean", "val/var",
)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; keep float32/float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Population mean and variance over all elements (tf.nn.moments)."""
    mean = x.mean()
    return mean, (x - mean).square().mean()


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    kl_coef: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (logprobs - ref_logprobs), plus the score at the last index T-1.

    scores (B,), logprobs/ref_logprobs (B, T) -> (rewards, non_score_reward, kl), each (B, T).
    """
    if logprobs.shape != ref_logprobs.shape or scores.shape != logprobs.shape[:1]:
        raise ValueError(f"need scores (B,) and logprobs/ref_logprobs (B, T), got {tuple(scores.shape)}, "
                         f"{tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}")
    kl = logprobs - ref_logprobs
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[:, -1] += scores
    return rewards, non_score_reward, kl


def whiten_in_groups(x: torch.Tensor, n_groups: int, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten each of n_groups contiguous row-chunks of x separately (the original's per-rank whitening: one chunk per
    virtual rank)."""
    if n_groups == 1:
        return whiten(x, shift_mean=shift_mean, eps=eps)
    rows = exact_div(x.shape[0], n_groups)
    xg = _f32(x).reshape(n_groups, rows, -1)  # (G, rows, rest)
    mean = xg.mean(dim=(1, 2), keepdim=True)
    var = (xg - mean).square().mean(dim=(1, 2), keepdim=True)
    whitened = (xg - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.reshape(x.shape)


def minibatch_orders(perms: torch.Tensor, nminibatches: int) -> torch.Tensor:
    """One PPO epoch's row order for G virtual ranks whose rows lie one rank after the other (b each): `perms`
    (G, b) holds each rank's own permutation of its rows. The result (G*b,) cut into nminibatches contiguous slices
    gives the epoch's minibatches; slice i holds, rank after rank, each rank's i-th minibatch (b / nminibatches of
    its own rows), so a rank's whitening group is always its own rows, in every epoch (ORIGINAL §10.2 step 6)."""
    G, b = perms.shape
    if b % nminibatches:
        raise ValueError(f"{b} rows per rank do not split into {nminibatches} minibatches")
    rows = perms + torch.arange(G, device=perms.device)[:, None] * b
    return rows.reshape(G, nminibatches, b // nminibatches).transpose(0, 1).reshape(-1)


class Advantages(NamedTuple):
    """Outputs of compute_advantages, each (B, T)."""
    advantages: torch.Tensor  # GAE advantages, whitened
    returns: torch.Tensor  # advantages_raw + values
    rewards: torch.Tensor  # the rewards GAE used (whitened with the mean added back when whiten_rewards)
    advantages_raw: torch.Tensor  # GAE advantages before whitening


def compute_advantages(values: torch.Tensor, rewards: torch.Tensor, gamma: float, lam: float,
                       whiten_rewards: bool, n_groups: int = 1) -> Advantages:
    """Reward whitening, GAE over T with V_T = 0, returns, and advantage whitening (ORIGINAL §10.3 steps 1-3).

    values, rewards (B, T). Whitening uses population variance over each of n_groups contiguous row-chunks.
    """
    if values.shape != rewards.shape or values.dim() != 2:
        raise ValueError(f"values and rewards must both be (B, T), got {tuple(values.shape)}, {tuple(rewards.shape)}")
    values, rewards = _f32(values), _f32(rewards)
    if whiten_rewards:
        rewards = whiten_in_groups(rewards, n_groups, shift_mean=False)
    gen_length = rewards.shape[1]
    lastgaelam = 0.0
    advantages_reversed = []
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages_raw = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages_raw + values
    advantages = whiten_in_groups(advantages_raw, n_groups)
    return Advantages(advantages=advantages, returns=returns, rewards=rewards, advantages_raw=advantages_raw)


def ppo_loss(logprob: torch.Tensor, vpred: torch.Tensor, entropies: torch.Tensor, old_logprob: torch.Tensor,
             old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, cliprange: float,
             cliprange_value: float, vf_coef: float) -> Tuple[torch.Tensor, Stats]:
    """Clipped policy loss + vf_coef * clipped value loss, no entropy bonus (ORIGINAL §10.3 steps 5-8).

    All inputs (B, T); logprob, vpred (and entropies) are the new forward's, the rest are rollout data
    (no gradient flows into them). Returns (loss, stats) with the 13 stats of PPO_STAT_KEYS.
    """
    logprob, vpred, entropies = _f32(logprob), _f32(vpred), _f32(entropies)
    old_logprob, old_values = _f32(old_logprob).detach(), _f32(old_values).detach()
    advantages, returns = _f32(advantages).detach(), _f32(returns).detach()

    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (vpred - returns).square()
    vf_losses2 = (vpredclipped - returns).square()
    vf_loss = 0.5 * torch.maximum(vf_losses1, vf_losses2).mean()
    vf_clipfrac = (vf_losses2 > vf_losses1).to(vf_losses1.dtype).mean()

    ratio = torch.exp(logprob - old_logprob)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.maximum(pg_losses, pg_losses2).mean()
    pg_clipfrac = (pg_losses2 > pg_losses).to(pg_losses.dtype).mean()

    loss = pg_loss + vf_coef * vf_loss

    with torch.no_grad():
        entropy = entropies.mean()
        approxkl = 0.5 * (logprob - old_logprob).square().mean()
        return_mean, return_var = _moments(returns)
        value_mean, value_var = _moments(old_values)
        stats = {
            "loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "loss/total": loss.detach(),
            "policy/entropy": entropy, "policy/approxkl": approxkl, "policy/clipfrac": pg_clipfrac,
            "returns/mean": return_mean, "returns/var": return_var,
            "val/vpred": vpred.detach().mean(), "val/error": (vpred.detach() - returns).square().mean(),
            "val/clipfrac": vf_clipfrac, "val/mean": value_mean, "val/var": value_var,
        }
    return loss, stats


def var_explained(val_error: torch.Tensor, returns_var: torch.Tensor) -> torch.Tensor:
    """1 - val/error / returns/var, computed from the (all-reduced) averaged stats."""
    return 1 - val_error / returns_var


def step_stats(*, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, non_score_reward: torch.Tensor,
               scores: torch.Tensor, kl_coef: float, train_stats: Sequence[Stats],
               reduce_fn: Optional[Callable[[Stats], Stats]] = None, diagnostics: Optional[Stats] = None) -> Stats:
    """The per-PPO-step stats of ORIGINAL §10.4: objective/{kl,kl_coef,entropy,score,score_total}, ppo/<each
    ppo_loss stat> averaged over the minibatches, and ppo/val/var_explained; plus `diagnostics` (0-d tensors
    under new names, e.g. lm_tasks.response_diagnostics), when given.

    logprobs/ref_logprobs/non_score_reward (B, T) are the rollout's, scores (B,) the penalized scores,
    train_stats one ppo_loss stats dict per minibatch. reduce_fn (e.g. an all-reduce mean over ranks) is
    applied before var_explained, as in the original; the diagnostics go through it in a call of their own, so
    the original's statistics are reduced exactly as without them.
    """
    if not train_stats:
        raise ValueError("step_stats needs the stats of at least one minibatch in train_stats")
    device = logprobs.device
    mean_kl = (logprobs - ref_logprobs).sum(dim=1).mean()
    mean_entropy = (-logprobs).sum(dim=1).mean()
    mean_non_score_reward = non_score_reward.sum(dim=1).mean()
    mean_score = _f32(scores).mean()
    stats = {
        "objective/kl": mean_kl,
        "objective/kl_coef": torch.as_tensor(float(kl_coef), dtype=torch.float32, device=device),
        "objective/entropy": mean_entropy,
        "objective/score": mean_score,
        "objective/score_total": mean_score + mean_non_score_reward,
    }
    for k in train_stats[0]:
        stats[f"ppo/{k}"] = torch.stack([s[k].to(device) for s in train_stats]).mean()
    stats = {k: v.detach().float() for k, v in stats.items()}
    if reduce_fn is not None:
        stats = reduce_fn(stats)
    stats["ppo/val/var_explained"] = var_explained(stats["ppo/val/error"], stats["ppo/returns/var"])
    if diagnostics:
        clash = sorted(set(diagnostics) & set(stats))
        if clash:
            raise ValueError(f"diagnostics must not reuse the names of the original's statistics: {clash}")
        extra = {k: torch.as_tensor(v, device=device).detach().float() for k, v in diagnostics.items()}
        stats.update(reduce_fn(extra) if reduce_fn is not None else extra)
    return stats


class FixedKLController:
    """A KL coefficient that never changes (rewards.adaptive_kl off)."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current: Union[float, torch.Tensor], n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon) (ORIGINAL §10.5)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not target > 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current: Union[float, torch.Tensor], n_steps: int) -> None:
        """Move beta toward the target given the mean per-episode KL of the step just taken."""
        proportional_error = min(max(float(current) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
