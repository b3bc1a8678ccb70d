"""The per-update diagnostics of the post-processed responses (lm_tasks.response_lengths, distinct_ngrams,
response_diagnostics; objective/{penalty_rate,response_length,distinct_2}) on hand-computed cases, and how
ppo.step_stats adds them without touching the original's statistics."""
import pytest
import torch

from lm_human_preferences import lm_tasks, ppo

PAD = 52
# truncate token 7 counting from index 1:
#   row 0  1 2 7 5 6  -> 1 2 7 . .   length 3, valid     bigrams (1,2) (2,7)
#   row 1  7 1 2 3 4  -> unchanged   length 5, penalized (the 7 at index 0 does not count): (7,1) (1,2) (2,3) (3,4)
#   row 2  1 1 1 1 1  -> unchanged   length 5, penalized  (1,1) x 4
#   row 3  3 7 7 7 7  -> 3 7 . . .   length 2, valid      (3,7)
RESPONSES = torch.tensor([[1, 2, 7, 5, 6], [7, 1, 2, 3, 4], [1, 1, 1, 1, 1], [3, 7, 7, 7, 7]])


def post():
    return lm_tasks.postprocess_responses(RESPONSES, 7, 1, PAD)


def test_response_lengths_count_up_to_and_including_the_truncate_token():
    assert post().tolist() == [[1, 2, 7, PAD, PAD], [7, 1, 2, 3, 4], [1, 1, 1, 1, 1], [3, 7, PAD, PAD, PAD]]
    assert lm_tasks.response_lengths(post(), 7, 1).tolist() == [3, 5, 5, 2]
    assert lm_tasks.response_lengths(RESPONSES, 7, 0).tolist() == [3, 1, 5, 2]  # index 0 counts now
    assert lm_tasks.response_lengths(RESPONSES, None, 1).tolist() == [5, 5, 5, 5]  # no truncation: T
    with pytest.raises(ValueError, match="-1"):
        lm_tasks.response_lengths(RESPONSES, 7, -1)


def test_distinct_bigrams_by_hand():
    lengths = torch.tensor([3, 5, 5, 2])
    # 11 bigrams: 2 + 4 + 4 + 1; distinct: (1,2) (2,7) (7,1) (2,3) (3,4) (1,1) (3,7) = 7
    assert float(lm_tasks.distinct_ngrams(post(), lengths)) == pytest.approx(7 / 11)
    # per group of two rows: rows 0-1 have 6 bigrams, 5 distinct; rows 2-3 have 5, 2 distinct
    assert float(lm_tasks.distinct_ngrams(post(), lengths, n_groups=2)) == pytest.approx((5 / 6 + 2 / 5) / 2)
    # unigrams: 15 tokens kept, distinct 1 2 7 3 4 = 5
    assert float(lm_tasks.distinct_ngrams(post(), lengths, n=1)) == pytest.approx(5 / 15)


def test_distinct_bigrams_never_cross_rows_and_padding_is_left_out():
    tokens = torch.tensor([[1, 2], [2, 1]])
    assert float(lm_tasks.distinct_ngrams(tokens, torch.tensor([2, 2]))) == 1.0  # no (2, 2) across the rows
    tokens = torch.tensor([[1, 2, PAD, PAD], [1, 2, PAD, PAD]])
    assert float(lm_tasks.distinct_ngrams(tokens, torch.tensor([2, 2]))) == 0.5  # (2, PAD) is not counted


def test_distinct_bigrams_without_any_bigram_count_one():
    tokens = torch.tensor([[7, PAD, PAD], [7, PAD, PAD], [1, 2, 3], [1, 2, 3]])
    one = torch.tensor([1, 1, 3, 3])
    # group 0 has no bigram (1), group 1 has 4 bigrams, 2 distinct
    assert float(lm_tasks.distinct_ngrams(tokens, one, n_groups=2)) == pytest.approx((1 + 0.5) / 2)
    assert float(lm_tasks.distinct_ngrams(torch.tensor([[5]]), torch.tensor([1]))) == 1.0  # T < n
    assert float(lm_tasks.distinct_ngrams(tokens[:2], one[:2])) == 1.0  # no bigram at all
    with pytest.raises(ValueError, match="equal groups"):
        lm_tasks.distinct_ngrams(tokens, one, n_groups=3)
    with pytest.raises(ValueError, match="lengths"):
        lm_tasks.distinct_ngrams(tokens, torch.tensor([1, 1]))


def test_response_diagnostics_by_hand():
    stats = lm_tasks.response_diagnostics(post(), 7, 1)
    assert set(stats) == {"objective/penalty_rate", "objective/response_length", "objective/distinct_2"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in stats.values())
    assert float(stats["objective/penalty_rate"]) == 0.5  # rows 1 and 2 get penalty_reward_value
    assert float(stats["objective/response_length"]) == pytest.approx(15 / 4)
    assert float(stats["objective/distinct_2"]) == pytest.approx(7 / 11)
    # without a truncate token nothing is penalized and every response is T tokens long
    plain = lm_tasks.response_diagnostics(torch.tensor([[1, 2, 1, 2], [3, 3, 3, 3]]), None, 0)
    assert float(plain["objective/penalty_rate"]) == 0.0
    assert float(plain["objective/response_length"]) == 4.0
    assert float(plain["objective/distinct_2"]) == 0.5  # (1,2) (2,1) (1,2) (3,3) x3: 3 distinct of 6


def _step_stats(**kwargs):
    z = torch.zeros(2, 3)
    train = [{k: torch.tensor(float(i + 1)) for i, k in enumerate(ppo.PPO_STAT_KEYS)}]
    return ppo.step_stats(logprobs=z + 0.5, ref_logprobs=z, non_score_reward=z - 0.1, scores=torch.tensor([1., 3.]),
                          kl_coef=0.1, train_stats=train, **kwargs)


def test_step_stats_adds_the_diagnostics_reduced_in_a_call_of_their_own():
    calls = []

    def reduce_fn(stats):
        calls.append(sorted(stats))
        return {k: v * 2 for k, v in stats.items()}

    plain = _step_stats(reduce_fn=reduce_fn)
    diagnostics = lm_tasks.response_diagnostics(post(), 7, 1)
    with_diag = _step_stats(reduce_fn=reduce_fn, diagnostics=diagnostics)
    assert calls[0] == calls[1] and calls[2] == sorted(diagnostics)  # the original's keys reduced as before
    assert {k: float(v) for k, v in with_diag.items() if k in plain} == {k: float(v) for k, v in plain.items()}
    assert float(with_diag["objective/penalty_rate"]) == 1.0  # through reduce_fn (x2 here)
    assert float(with_diag["objective/distinct_2"]) == pytest.approx(14 / 11)
    assert set(with_diag) - set(plain) == set(diagnostics)
    no_reduce = _step_stats(diagnostics=diagnostics)
    assert float(no_reduce["objective/response_length"]) == pytest.approx(15 / 4)
    with pytest.raises(ValueError, match="objective/kl"):
        _step_stats(diagnostics={"objective/kl": torch.tensor(0.0)})
