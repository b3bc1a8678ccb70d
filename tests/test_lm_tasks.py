"""lm_tasks.py against the original's postprocess/filter/penalty/formatter outputs (tests/reference/postprocess.npz)
and hand-made cases."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences import lm_tasks

REF = Path(__file__).parent / "reference"
PAD = 52


@pytest.fixture(scope="module")
def ref():
    return np.load(REF / "postprocess.npz")


def test_postprocess_valid_and_scores_match_original(ref):
    responses = torch.tensor(ref["in/responses"])
    raw_scores = torch.tensor(ref["in/raw_scores"])
    token, pad = int(ref["in/truncate_token"]), int(ref["in/padding_token"])
    penalty = json.loads(str(ref["meta_json"]))["penalty_reward_value"]
    for ta in ref["in/truncate_afters"].tolist():
        post = lm_tasks.postprocess_responses(responses, token, ta, pad)
        valid = lm_tasks.responses_valid(post, token, ta)
        scores = lm_tasks.penalized_scores(raw_scores, valid, penalty)
        np.testing.assert_array_equal(post.numpy(), ref[f"out/ta{ta}/postprocessed"])
        np.testing.assert_array_equal(valid.numpy(), ref[f"out/ta{ta}/valid"])
        np.testing.assert_array_equal(scores.numpy(), ref[f"out/ta{ta}/scores"])
    post = lm_tasks.postprocess_responses(responses, None, 0, pad)
    np.testing.assert_array_equal(post.numpy(), ref["out/none/postprocessed"])
    np.testing.assert_array_equal(lm_tasks.responses_valid(post, None, 0).numpy(), ref["out/none/valid"])


def test_format_queries_matches_original(ref):
    queries = torch.tensor(ref["in/queries"])
    out = lm_tasks.format_queries(queries, [0, 1], [2])  # 'ab' and 'c' under the fake encoder
    np.testing.assert_array_equal(out.numpy(), ref["out/query_formatted"])
    out = lm_tasks.format_queries(queries.long(), torch.tensor([0, 1]), torch.tensor([], dtype=torch.long))
    assert out.dtype == torch.long and out.shape == (8, 7)
    assert torch.equal(lm_tasks.format_queries(queries, [], []), queries)


def test_truncate_token_only_before_truncate_after_is_penalized():
    responses = torch.tensor([[5, 7, 3, 4, 6, 8]])
    post = lm_tasks.postprocess_responses(responses, 7, 2, PAD)
    assert torch.equal(post, responses)
    valid = lm_tasks.responses_valid(post, 7, 2)
    assert valid.tolist() == [False]
    assert lm_tasks.penalized_scores(torch.tensor([2.5]), valid, -1).tolist() == [-1.0]


def test_truncate_token_at_truncate_after_is_kept_and_rest_padded():
    responses = torch.tensor([[7, 1, 7, 3, 7, 4], [1, 2, 3, 4, 5, 7]])
    post = lm_tasks.postprocess_responses(responses, 7, 2, PAD)
    assert post.tolist() == [[7, 1, 7, PAD, PAD, PAD], [1, 2, 3, 4, 5, 7]]
    assert lm_tasks.responses_valid(post, 7, 2).tolist() == [True, True]
    scores = lm_tasks.penalized_scores(torch.tensor([0.5, -0.25]), torch.tensor([True, True]), -1)
    assert scores.tolist() == [0.5, -0.25]


def test_without_truncate_token_responses_are_untouched():
    responses = torch.tensor([[7, 7, 7], [1, 2, 3]])
    post = lm_tasks.postprocess_responses(responses, None, 1, PAD)
    assert torch.equal(post, responses)
    assert lm_tasks.responses_valid(post, None, 1).tolist() == [True, True]


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="-1"):
        lm_tasks.postprocess_responses(torch.zeros(1, 3, dtype=torch.long), 7, -1, PAD)
    with pytest.raises(ValueError, match="shape"):
        lm_tasks.penalized_scores(torch.zeros(3), torch.ones(2, dtype=torch.bool), -1)
