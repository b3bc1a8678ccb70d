"""The demo's evaluation: labeler score and KL of a policy on held-out queries.

`evaluate_policy` samples one response per held-out query at the task temperature, post-processes it as PPO does
(truncation), scores it with the labeler (VADER compound, in [-1, 1]) and with the trained reward model, and
measures the KL to the reference policy the way `objective/kl` does: the sum over the response's tokens of
`logprob - ref_logprob` (temperature-scaled, un-truncated sample), averaged over episodes. Sampling and scoring go
through `runs.rollout`, the path PPO's rollouts take.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lm_human_preferences import runs


def evaluate_policy(policy, ref_policy, reward_model, queries: torch.Tensor, task, enc, labeler,
                    generator: torch.Generator, batch_size: int = 64) -> dict:
    """Per-sample and mean labeler score, reward-model score and KL to `ref_policy` on `queries` (n, q).

    Runs in float32 (no autocast), `batch_size` queries at a time. The reward is the reward model's raw score,
    without the task's truncation penalty. Returns {'samples': [{query, response, score, reward, kl}], 'score',
    'score_std', 'score_stderr', 'reward', 'kl', 'kl_stderr'}.
    """
    out = runs.rollout(policy, queries, task, enc.padding_token, generator=generator, precision="fp32",
                       ref_policy=ref_policy, score_model=reward_model, micro_batch=batch_size)
    kl = (out["logprobs"] - out["ref_logprobs"]).sum(dim=1)  # (n,) nats per episode
    texts = [enc.decode(row) for row in out["postprocessed"].cpu().tolist()]
    scores = labeler(texts)
    samples = [{"query": enc.decode(queries[i].cpu().tolist()), "response": text, "score": float(scores[i]),
                "reward": float(out["raw_scores"][i]), "kl": float(kl[i])} for i, text in enumerate(texts)]
    scores = np.array([s["score"] for s in samples])
    kls = np.array([s["kl"] for s in samples])
    n = len(samples)
    return {"samples": samples, "score": float(scores.mean()), "score_std": float(scores.std()),
            "score_stderr": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "reward": float(np.mean([s["reward"] for s in samples])), "kl": float(kls.mean()),
            "kl_stderr": float(kls.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}


def summarize_evaluation(results: dict) -> dict:
    """The headline numbers of an evaluation (without the samples)."""
    def strip(r):
        return {k: v for k, v in r.items() if k != "samples"}

    initial, reseeded, final = results["initial"], results["initial_reseeded"], results["final"]
    return {"num_queries": results["num_queries"], "initial": strip(initial), "initial_reseeded": strip(reseeded),
            "final": strip(final), "score_rise": final["score"] - initial["score"],
            "score_rise_stderr": math.hypot(final["score_stderr"], initial["score_stderr"]),
            "seed_difference": reseeded["score"] - initial["score"],
            "seed_difference_stderr": math.hypot(reseeded["score_stderr"], initial["score_stderr"]),
            # the final reward model's accuracy on VADER-labeled best-of-4 comparisons of the final policy's samples
            "final_policy_rm_accuracy": results.get("final_policy_rm_accuracy")}
