"""demo/evaluate.py: the held-out evaluation of a policy."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences.demo.evaluate import evaluate_policy
from lm_human_preferences.demo.profiles import PROFILES, DemoPaths, reward_hparams
from lm_human_preferences.language import model as gpt2
from lm_human_preferences.language.encodings import get_encoding
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel


def test_evaluate_policy_of_the_reference_itself_has_zero_kl():
    torch.manual_seed(0)
    enc = get_encoding("test")
    policy = Policy(gpt2.GPT2(gpt2.test_config(), ["value"]), temperature=0.7, padding_token=enc.padding_token).eval()
    reward_model = RewardModel(gpt2.GPT2(gpt2.test_config(), ["reward"]), padding_token=enc.padding_token).eval()
    task = reward_hparams(PROFILES["fast"], DemoPaths(Path("w"), Path("o")), "cpu").task
    task.response_length, task.truncate_token, task.truncate_after = 3, 26, 1
    queries = torch.randint(0, 27, (10, 4))

    def labeler(texts):
        return np.array([text.count("a") / 3 for text in texts])

    result = evaluate_policy(policy, policy, reward_model, queries, task, enc, labeler,
                             torch.Generator().manual_seed(0), batch_size=4)
    assert len(result["samples"]) == 10
    assert abs(result["kl"]) < 1e-4
    assert result["score"] == pytest.approx(np.mean([s["score"] for s in result["samples"]]))
    assert all(set(s) == {"query", "response", "score", "reward", "kl"} for s in result["samples"])
